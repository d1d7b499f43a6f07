"""The model: relational layers and their dense paths, encoders, the per-pair scoring (MODEL.md), losses."""
