"""Original-style per-caption loop, re-implemented: the baseline of the "x times the original" figures.

This is our own code, written from ``MODEL.md`` §2-4 and the description of the original SGRAF / HSC code, NOT a copy
of it. It reproduces the original ALGORITHM and its layout, on the weights of an :class:`hsc_pyg.nn.model.HSCModel`
(so it gives the same scores, which :func:`check_scores_match` asserts):

* scoring (SGRAF ``EncoderSimilarity.forward``, used unchanged by HSC): the global image vectors of the block are
  computed once per call; then a Python loop over captions: the caption is cut to its length, **repeated once per
  image**, its global vector computed by TextSA, SCAN text-to-image attention through ``bmm`` on the repeated copy,
  local and global alignments, the SAF or SGR head, the sigmoid score; the columns are concatenated.
* evaluation (SCAN/SGRAF ``shard_attn_scores``): that function called on shards of 100 images x 100 captions, its
  output copied into a float64 NumPy matrix.
* training (HSC ``train_emb``): a padded dense batch of B images (one per caption, repeats included) and B captions;
  the image blocks as Conv1d on ``[B, d, 36]``; the word blocks on the padded ``[B, L_max, w]`` batch, dividing by the
  padded length; the packed bi-GRU; the per-caption loop above on the ``[B, B]`` pairs; hinge loss with hardest
  negatives; backward; gradient clipping at 2.0; Adam.

Nothing here is used by the library.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from hsc_pyg.engine import blocking

LABEL = "original-style per-caption loop, re-implemented"


def l2norm(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    norm = torch.pow(x, 2).sum(dim=dim, keepdim=True).sqrt() + eps
    return torch.div(x, norm)


def l1norm(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    norm = torch.abs(x).sum(dim=dim, keepdim=True) + eps
    return torch.div(x, norm)


# --------------------------------------------------------------------------- the similarity (per-caption loop)
def visual_sa(sa, local: Tensor, raw_global: Tensor) -> Tensor:
    """VisualSA as the original writes it: the global embedding repeated over the regions, weights, l2norm."""
    l_emb = sa.local_embed(local)
    g_emb = sa.global_embed(raw_global)
    g_emb = g_emb.unsqueeze(1).repeat(1, l_emb.size(1), 1)
    weights = sa.attn_score(l_emb.mul(g_emb)).squeeze(2)
    weights = torch.softmax(weights, dim=1)
    return l2norm((weights.unsqueeze(2) * local).sum(dim=1), dim=-1)


def text_sa(sa, local: Tensor, raw_global: Tensor) -> Tensor:
    l_emb = sa.local_embed(local)
    g_emb = sa.global_embed(raw_global)
    g_emb = g_emb.unsqueeze(1).repeat(1, l_emb.size(1), 1)
    weights = sa.attn_score(l_emb.mul(g_emb)).squeeze(2)
    weights = torch.softmax(weights, dim=1)
    return l2norm((weights.unsqueeze(2) * local).sum(dim=1), dim=-1)


def scan_attention(query: Tensor, context: Tensor, smooth: float) -> Tensor:
    """SCAN text-to-image attention on a repeated caption: ``query [n, L, d]`` (words), ``context [n, R, d]``
    (regions) -> attended region context per word ``[n, L, d]``, through ``bmm`` and explicit transposes."""
    query_t = torch.transpose(query, 1, 2)
    attn = torch.bmm(context, query_t)                         # [n, R, L]
    attn = F.leaky_relu(attn, 0.1)
    attn = l2norm(attn, 2)
    attn = torch.transpose(attn, 1, 2).contiguous()           # [n, L, R]
    attn = F.softmax(attn * smooth, dim=2)
    attn_t = torch.transpose(attn, 1, 2).contiguous()         # [n, R, L]
    context_t = torch.transpose(context, 1, 2)                # [n, d, R]
    weighted = torch.bmm(context_t, attn_t)                   # [n, d, L]
    weighted = torch.transpose(weighted, 1, 2)
    return l2norm(weighted, dim=-1)


def saf(head, sim_emb: Tensor) -> Tensor:
    """SAF: gate, BatchNorm1d(1) on ``[n, 1, L+1]`` (per-call statistics in training), sigmoid, l1norm, pool."""
    gate = head.gate(sim_emb).permute(0, 2, 1)                # [n, 1, L+1]
    gate = nn.BatchNorm1d.forward(head.norm, gate)            # the plain BatchNorm1d(1) of the original
    sim_attn = l1norm(torch.sigmoid(gate), dim=-1)
    pooled = torch.matmul(sim_attn, sim_emb)
    return l2norm(pooled.squeeze(1), dim=-1)


def sgr(head, sim_emb: Tensor) -> Tensor:
    for step in head.steps:
        q = step.query(sim_emb)
        k = step.key(sim_emb)
        edges = torch.softmax(torch.bmm(q, k.permute(0, 2, 1)), dim=-1)
        sim_emb = F.relu(step.update(torch.bmm(edges, sim_emb)))
    return sim_emb[:, 0, :]


def similarity(sim, img_emb: Tensor, cap_emb: Tensor, cap_lens) -> Tensor:
    """``EncoderSimilarity.forward``: ``img_emb [n_img, R, d]``, ``cap_emb [n_cap, L_max, d]`` -> ``[n_img, n_cap]``."""
    sim_all = []
    n_image = img_emb.size(0)
    n_caption = cap_emb.size(0)
    img_ave = torch.mean(img_emb, 1)
    img_glo = visual_sa(sim.visual_sa, img_emb, img_ave)
    is_saf = hasattr(sim.head, "gate")
    for i in range(n_caption):
        n_word = int(cap_lens[i])
        cap_i = cap_emb[i, :n_word, :].unsqueeze(0)
        cap_i_expand = cap_i.repeat(n_image, 1, 1)
        cap_ave_i = torch.mean(cap_i, 1)
        cap_glo_i = text_sa(sim.text_sa, cap_i, cap_ave_i)
        context_img = scan_attention(cap_i_expand, img_emb, smooth=sim.lambda_softmax)
        sim_loc = torch.pow(torch.sub(context_img, cap_i_expand), 2)
        sim_loc = l2norm(sim.loc_proj(sim_loc), dim=-1)
        sim_glo = torch.pow(torch.sub(img_glo, cap_glo_i), 2)
        sim_glo = l2norm(sim.glo_proj(sim_glo), dim=-1)
        sim_emb = torch.cat([sim_glo.unsqueeze(1), sim_loc], 1)
        sim_vec = saf(sim.head, sim_emb) if is_saf else sgr(sim.head, sim_emb)
        sim_all.append(torch.sigmoid(sim.score_proj(sim_vec)))
    return torch.cat(sim_all, 1)


@torch.no_grad()
def shard_scores(sim, img_embs: Tensor, cap_embs: Tensor, cap_lens, shard_size: int = 100) -> np.ndarray:
    """``shard_attn_scores``: the loop above on shards of ``shard_size`` images x ``shard_size`` captions, filling a
    float64 NumPy matrix (the original's layout)."""
    n_im_shard = (len(img_embs) - 1) // shard_size + 1
    n_cap_shard = (len(cap_embs) - 1) // shard_size + 1
    sims = np.zeros((len(img_embs), len(cap_embs)))
    for i in range(n_im_shard):
        im_start, im_end = shard_size * i, min(shard_size * (i + 1), len(img_embs))
        for j in range(n_cap_shard):
            ca_start, ca_end = shard_size * j, min(shard_size * (j + 1), len(cap_embs))
            im = img_embs[im_start:im_end].float()
            ca = cap_embs[ca_start:ca_end].float()
            ln = cap_lens[ca_start:ca_end]
            sims[im_start:im_end, ca_start:ca_end] = similarity(sim, im, ca, ln).cpu().numpy()
    return sims


# --------------------------------------------------------------------------- the encoders (HSC's dense padded form)
def image_block(layer, v: Tensor) -> Tensor:
    """HSC's image block in Conv1d layout: ``v [B, d, N]`` -> ``[B, d, N]``."""
    n = v.size(2)

    def conv(lin, x):  # Conv1d(kernel 1) with the Linear's weights
        return F.conv1d(x, lin.weight.unsqueeze(-1), lin.bias)

    g_v = conv(layer.message_proj, v).permute(0, 2, 1)                        # [B, N, d]
    theta_v = layer.theta_mix(conv(layer.theta, v).permute(0, 2, 1))          # [B, N, d]
    phi_v = layer.phi_mix(conv(layer.phi, v).permute(0, 2, 1)).permute(0, 2, 1)  # [B, d, N]
    relation = torch.matmul(theta_v, phi_v) / n                               # [B, N, N]
    y = torch.matmul(relation, g_v).permute(0, 2, 1).contiguous()             # [B, d, N]
    w_y = layer.norm(conv(layer.update_proj, y))                              # BatchNorm1d(d) on [B, d, N]
    return w_y + v


def word_block(layer, x: Tensor) -> Tensor:
    """HSC's word block on the padded batch ``x [B, L_max, w]``, dividing by the padded length."""
    l = layer.dropout(torch.tanh(layer.query(x)))
    g = layer.dropout(torch.tanh(layer.key(x)))
    v = layer.dropout(torch.tanh(layer.value(x)))
    relation = torch.matmul(l, g.permute(0, 2, 1)) / x.size(1)
    return x + torch.matmul(relation, v)


def encode_images(model, images: Tensor) -> Tensor:
    """``images [B, 36, img_dim]`` -> ``[B, 36, d]`` (fc, the blocks in Conv1d layout, l2norm)."""
    enc = model.image_encoder
    v = enc.fc(images)
    if len(enc.stack.layers) and enc.stack.layers[0].registry_name == "hsc":
        v = v.permute(0, 2, 1)
        for layer in enc.stack.layers:
            v = image_block(layer, v)
        v = v.permute(0, 2, 1)
    return v if enc.no_imgnorm else l2norm(v, dim=-1)


def encode_captions(model, tokens: Tensor, lengths: Tensor) -> Tensor:
    """Padded ``tokens [B, L_max]`` -> ``[B, L_max, d]`` (embedding, dropout, word blocks, packed bi-GRU averaged)."""
    enc = model.text_encoder
    x = enc.dropout(enc.embed(tokens))
    for layer in enc.stack.layers:
        if layer.registry_name == "hsc_text":
            x = word_block(layer, x)
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = enc.gru(packed)
    padded, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.size(1))
    half = padded.size(2) // 2
    cap_emb = (padded[:, :, :half] + padded[:, :, half:]) / 2
    return cap_emb if enc.no_txtnorm else l2norm(cap_emb, dim=-1)


def contrastive_loss(scores: Tensor, margin: float = 0.2) -> Tensor:
    """VSE++ hinge loss with the hardest negatives, summed (the original ``ContrastiveLoss(max_violation=True)``)."""
    diagonal = scores.diag().view(scores.size(0), 1)
    d1 = diagonal.expand_as(scores)
    d2 = diagonal.t().expand_as(scores)
    cost_s = (margin + scores - d1).clamp(min=0)
    cost_im = (margin + scores - d2).clamp(min=0)
    mask = torch.eye(scores.size(0), device=scores.device) > 0.5
    cost_s = cost_s.masked_fill_(mask, 0)
    cost_im = cost_im.masked_fill_(mask, 0)
    return cost_s.max(1)[0].sum() + cost_im.max(0)[0].sum()


def forward_loss(model, images: Tensor, tokens: Tensor, lengths: Tensor, margin: float = 0.2) -> Tensor:
    """The original-style forward pass and hinge loss of a padded dense batch (see :func:`train_step`)."""
    img_emb = encode_images(model, images)
    cap_emb = encode_captions(model, tokens, lengths)
    scores = similarity(model.similarity, img_emb, cap_emb, lengths.tolist())
    return contrastive_loss(scores, margin)


def train_step(model, optimizer, images: Tensor, tokens: Tensor, lengths: Tensor, grad_clip: float = 2.0,
               margin: float = 0.2) -> float:
    """One original-style HSC training step on a padded dense batch: ``images [B, 36, img_dim]`` (caption b's image
    at row b), ``tokens [B, L_max]``, ``lengths [B]``. Returns the loss."""
    optimizer.zero_grad()
    loss = forward_loss(model, images, tokens, lengths, margin)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


# --------------------------------------------------------------------------- checks
def check_scores_match(model, img_enc, cap_enc, atol: float = 1e-5) -> float:
    """Assert the per-caption loop gives ``blocking.score``'s matrix (eval mode, single alignment level) within ``atol``;
    return the largest difference."""
    if img_enc.regions.size(1) != 1:
        raise ValueError("the original-style loop aligns one level only (align_levels=higher)")
    lengths = cap_enc.lengths.tolist()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ours = blocking.score(model, img_enc, cap_enc).double()
            theirs = torch.from_numpy(shard_scores(model.similarity, img_enc.regions[:, 0], cap_enc.padded()[0][:, 0],
                                                   lengths, shard_size=7))
    finally:
        model.train(was_training)
    diff = float((ours - theirs).abs().max())
    if not math.isfinite(diff) or diff > atol:
        raise AssertionError(f"{LABEL}: scores differ from blocking.score by {diff:.3g} (> {atol})")
    return diff
