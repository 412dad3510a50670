"""Reference implementations the tests compare vtprune against: each published rule written the
straightforward (slow) way, from the model's own eager attention or a plain loop, and inputs whose
scores fp32 rounding cannot reorder. Helpers only: no tests here."""

import math

import torch

from vtprune.testing import IMAGE_TOKEN_ID


def image_features(model, inputs):
    with torch.no_grad():
        return model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]


def naive_max_min_diversity(x, k):
    """DivPrune's rule with the full distance matrix and a Python loop."""
    x = x.double()
    u = x / x.norm(dim=1, keepdim=True)
    dist = 1 - u @ u.T
    n = x.shape[0]
    nearest = [min((dist[i, j].item() for j in range(n) if j != i), default=float("inf")) for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(chosen) < k:
        closest = dist[:, chosen].min(dim=1).values.tolist()
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (closest[i], -i)))
    return torch.tensor(sorted(chosen))


def eager_cls_scores(model, inputs, layers):
    """Head-mean CLS -> patch attention read off an eager tower's returned attention maps."""
    tower = model.model.vision_tower
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_attentions=True)
    return sum(out.attentions[i][0, :, 0, 1:].mean(0) for i in layers)


def fastv_reference_kept(eager_model, inputs, layer, keep):
    """FastV's rule on an eager model's returned attention: last token, layer K-1, head mean."""
    with torch.no_grad():
        out = eager_model(**inputs, output_attentions=True)
    image = (inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().flatten()
    scores = out.attentions[layer - 1][0, :, -1, image].mean(0)
    return scores.topk(keep).indices.sort().values


def reference_generate(model, inputs, drops, n, features=None, held=None, scores=None, recycled=None):
    """Greedy decoding with no cache, recomputing everything each step: from each drop point's layer
    on, only that drop's kept image tokens (``drops``: [(layer, kept indices), ...], kept as in
    ``PruneStats``) plus all text and generated tokens go on, at their original positions.
    ``features``: the image tokens to place in the prompt (default: the image's features).
    ``held``: {layer: kept indices}, the image tokens the generated tokens may attend to in that layer
    (a cache policy's choice; default: those the prompt's tokens see there). ``scores``: a list to
    which each step's last-position logits (1, V) are appended. ``recycled``: {layer: [(members,
    weights or None), ...]}, image tokens (anchor first) whose hidden states, as they enter the layer,
    are averaged (weighted) into their anchor, which ``drops`` keeps."""
    lm = model.model.language_model
    ids = inputs["input_ids"]
    prompt = ids.shape[1]
    image = (ids[0] == IMAGE_TOKEN_ID).nonzero().flatten()
    features = image_features(model, inputs) if features is None else features
    drops, held, recycled = dict(drops), held or {}, recycled or {}
    for _ in range(n):
        length = ids.shape[1]
        with torch.no_grad():
            h = model.get_input_embeddings()(ids)
            h[0, image] = features
            positions = torch.arange(length)
            cos, sin = lm.rotary_emb(h, positions[None])
            for i, decoder_layer in enumerate(lm.layers):
                merged = []
                for members, weights in recycled.get(i, []):
                    rows = torch.stack([(positions == p).nonzero()[0, 0] for p in image[members]])
                    w = torch.ones(len(members)) if weights is None else weights
                    merged.append((image[members[0]], (w[:, None] * h[0, rows]).sum(0) / w.sum()))
                if i in drops:
                    keep = torch.ones(length, dtype=torch.bool)
                    dropped = torch.ones(image.numel(), dtype=torch.bool)
                    dropped[drops[i]] = False
                    keep[image[dropped]] = False
                    keep = keep[positions]  # of the tokens still here
                    h, cos, sin, positions = h[:, keep], cos[:, keep], sin[:, keep], positions[keep]
                for anchor, x in merged:
                    h[0, (positions == anchor).nonzero()[0, 0]] = x
                allowed = positions[None, :] <= positions[:, None]
                if i in held:
                    unseen = torch.zeros(length, dtype=torch.bool)  # by the generated tokens
                    unseen[image] = True
                    unseen[image[held[i]]] = False
                    allowed &= ~((positions[:, None] >= prompt) & unseen[positions][None, :])
                mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
                h = decoder_layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions[None])
            step_logits = model.lm_head(lm.norm(h[:, -1]))
            next_token = step_logits.argmax(-1)
        if scores is not None:
            scores.append(step_logits)
        ids = torch.cat([ids, next_token[:, None]], dim=1)
    return ids


def fastv_reference_generate(model, inputs, kept, layer, n):
    return reference_generate(model, inputs, [(layer, kept)], n)


def sparse_sign_rows(b, n, d, nonzero, seed):
    """(B, N, D) rows with ``nonzero`` entries of +-1 (a perfect square): cosine similarities are exact
    multiples of 1/nonzero in any summation order, so fp32 rounding cannot decide a comparison."""
    g = torch.Generator().manual_seed(seed)
    where = torch.rand(b, n, d, generator=g).argsort(dim=-1)[..., :nonzero]
    signs = torch.randint(0, 2, (b, n, nonzero), generator=g).float() * 2 - 1
    return torch.zeros(b, n, d).scatter_(-1, where, signs)


def full_matrix_max_min_diversity(x, k):
    """DivPrune's rule with the whole N x N distance matrix in memory and a Python loop over picks."""
    u = x / x.norm(dim=1, keepdim=True)
    dist = 1 - u @ u.T
    dist.fill_diagonal_(float("inf"))
    chosen = [int(dist.min(dim=1).values.argmax())]
    closest = dist[chosen[0]].clone()
    for _ in range(k - 1):
        closest[chosen] = -float("inf")
        chosen.append(int(closest.argmax()))
        closest = torch.minimum(closest, dist[chosen[-1]])
    return torch.tensor(chosen)


def naive_k_center(x, k, first):
    u = (x / x.norm(dim=1, keepdim=True)).double()
    chosen = [first]
    while len(chosen) < k:
        nearest_centre = (u @ u[chosen].T).max(dim=1).values  # similarity to the closest centre
        nearest_centre[chosen] = float("inf")
        chosen.append(int(nearest_centre.argmin()))
    return torch.tensor(chosen)


# ToMe's own algorithm, restated from its reference code (facebookresearch/ToMe, merge.py): the
# matching returns a merge function; merge(x, "sum") of size-weighted tokens, merge(source, "amax") of
# a (B, N, P) one-hot source matrix tracks which patches each token holds.
def tome_matching(metric, r, class_token, distill_token=False):
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


# PiToMe's energy-guided matching, restated from its reference code (hchautran/PiToMe, merge.py) one
# sample at a time with plain loops; returns a merge function like tome_matching's.
def pitome_matching(metric, r, margin, mode, class_token=True):
    start = 1 if class_token else 0

    def plan(m):
        t = m.shape[0] - start
        u = m[start:].double()
        u = u / u.norm(dim=-1, keepdim=True)
        sim = u @ u.T
        energy = torch.tensor(
            [sum(torch.nn.functional.elu(sim[i, j] - margin) for j in range(t)) / t for i in range(t)]
        )
        rank = sorted(range(t), key=lambda i: -float(energy[i]))  # stable: ties keep the lower index
        if mode == "pitome":
            a, b, rest = rank[: 2 * r : 2], rank[1 : 2 * r : 2], rank[2 * r :]
            into = [b[max(range(len(b)), key=lambda j: (float(sim[i, b[j]]), -j))] for i in a]
            return a, into, rest, b
        a, b = rank[0::2], rank[1::2]
        best = [max(range(len(b)), key=lambda j: (float(sim[i, b[j]]), -j)) for i in a]
        order = sorted(range(len(a)), key=lambda k: -float(sim[a[k], b[best[k]]]))
        return [a[k] for k in order[:r]], [b[best[k]] for k in order[:r]], [a[k] for k in order[r:]], b

    plans = [plan(m) for m in metric]

    def merge(x, mode_):
        out = []
        for xs, (merged, into, rest, b) in zip(x, plans):
            body = xs[start:]
            dst = body[b].clone()
            for i, j in zip(merged, into):
                k = b.index(j)
                dst[k] = torch.maximum(dst[k], body[i]) if mode_ == "amax" else dst[k] + body[i]
            out.append(torch.cat([xs[:start], body[rest], dst]))
        return torch.stack(out)

    return merge


# MustDrop's conditional pooling (liuting20/MustDrop, local_merge.py), restated one sample and one
# window at a time: a CLS token first, the patches on a square grid cut into k x k windows; a window's
# score is the mean cosine of its distinct token pairs; with a threshold, every sample merges as many
# windows as the sample with the fewest windows scoring at least it (its best ones); with ``merges``
# (vtprune's keep), the best windows merge whole and the next one partly (its tokens most similar to
# its last one). Returns a merge function like tome_matching's, in the reference's order: CLS, the
# merged windows (best first, each into its last token), the other patches ascending.
def mustdrop_windows(metric, k=3, threshold=None, merges=None):
    cos = torch.nn.functional.cosine_similarity
    patches = metric[:, 1:].double()
    side = math.isqrt(patches.shape[1])
    windows = [
        [(wr * k + i) * side + wc * k + j for i in range(k) for j in range(k)]
        for wr in range(side // k)
        for wc in range(side // k)
    ]

    def score(p, w):
        pairs = [float(cos(p[a], p[b], dim=0)) for a in w for b in w if a != b]
        return sum(pairs) / len(pairs)

    scores = [[score(p, w) for w in windows] for p in patches]
    ranks = [sorted(range(len(windows)), key=lambda i: -s[i]) for s in scores]  # stable on ties
    if threshold is not None:
        whole, partial = min(sum(v >= threshold for v in s) for s in scores), 0
    else:
        whole, partial = divmod(merges, k * k - 1)
    plans = []
    for p, rank in zip(patches, ranks):
        groups = [windows[i] for i in rank[:whole]]
        if partial:
            w = windows[rank[whole]]
            near = sorted(w[:-1], key=lambda a: -float(cos(p[a], p[w[-1]], dim=0)))
            groups.append(near[:partial] + [w[-1]])
        merged = {a for g in groups for a in g}
        plans.append((groups, [a for a in range(patches.shape[1]) if a not in merged]))

    def merge(x, mode):
        out = []
        for xs, (groups, rest) in zip(x, plans):
            body = xs[1:]
            reduce = (lambda t: t.amax(0)) if mode == "amax" else (lambda t: t.sum(0))
            dst = [reduce(body[g]) for g in groups]
            out.append(torch.cat([xs[:1], torch.stack(dst) if dst else body[:0], body[rest]]))
        return torch.stack(out)

    return merge


# Zero-TPrune's step in one block, restated one sample, head and token at a time: the Weighted PageRank
# s_j <- sum_i s_i A[i, j] from uniform scores (prefix tokens sqrt(N) times higher), heads whose
# variance of N * s lies outside the band left out (all kept if none is in it), root mean square over
# heads; then the less important half of the patches, each by its largest cosine to the other half,
# the r largest dropped. Returns the dropped positions per sample.
def zerotprune_drops(attention, metric, r, iterations, protected=1, band=(0.01, 0.7)):
    dropped = []
    for a, m in zip(attention.double(), metric.double()):
        heads, n = a.shape[0], a.shape[-1]
        scores = []
        for h in range(heads):
            s = [math.sqrt(n) if j < protected else 1.0 for j in range(n)]
            s = [v / sum(s) for v in s]
            for _ in range(iterations):
                s = [sum(s[i] * float(a[h, i, j]) for i in range(n)) for j in range(n)]
            scores.append(s)
        spread = [sum((n * v - sum(n * w for w in s) / n) ** 2 for v in s) / n for s in scores]
        chosen = [h for h in range(heads) if band is None or band[0] <= spread[h] <= band[1]] or list(range(heads))
        importance = [math.sqrt(sum(scores[h][j] ** 2 for h in chosen) / len(chosen)) for j in range(n)]
        order = sorted(range(protected, n), key=lambda j: importance[j])
        half = (n - protected) // 2
        low, high = order[:half], order[half:]
        cos = torch.nn.functional.cosine_similarity
        closest = {i: max(float(cos(m[i], m[j], dim=0)) for j in high) for i in low}
        dropped.append(sorted(sorted(low, key=lambda i: -closest[i])[: min(r, half)]))
    return dropped


def naive_density_peaks(x, clusters, k=None):
    """DPC-kNN (SparseVLM's recycling, after TCFormer) with Python loops over the rows."""
    x = x.double()
    n, d = x.shape
    k = clusters if k is None else k
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(d) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(v * v for v in sorted(row)[:k]) / k) for row in dist]
    largest = max(max(row) for row in dist)
    delta = [min([dist[i][j] for j in range(n) if density[j] > density[i]], default=largest) for i in range(n)]
    order = sorted(range(n), key=lambda i: (-delta[i] * density[i], i))
    centres = order[:clusters]
    assignment = [min(range(clusters), key=lambda c: (dist[centres[c]][i], c)) for i in range(n)]
    for c, i in enumerate(centres):
        assignment[i] = c
    return torch.tensor(assignment), torch.tensor(centres)


# AIM's merge (LaVi-Lab/AIM, its LLaVA-1.5 code: bipartite_soft_matching_merge), restated on one
# sample: even tokens into their most similar odd ones by cosine, the r most similar merge, each odd
# token the plain mean of itself and those merged into it; the result in the reference's order
# (unmerged even tokens by similarity, then the odd ones). Rounds in a row, merging the metric the same
# way. Returns the merged x (N', C) and per token the patches behind it.
def aim_merge(metric, x, rs):
    groups = [[i] for i in range(x.shape[0])]
    for r in rs:
        unit = metric / metric.norm(dim=-1, keepdim=True)
        node_max, node_idx = (unit[::2] @ unit[1::2].T).max(dim=-1)
        edge = node_max.argsort(descending=True)
        unmerged, src, dst = edge[r:], edge[:r], node_idx[edge[:r]]

        def merge(t, unmerged=unmerged, src=src, dst=dst):
            even, odd = t[::2], t[1::2]
            index = dst[:, None].expand(-1, t.shape[1])
            return torch.cat([even[unmerged], odd.scatter_reduce(0, index, even[src], reduce="mean")])

        x, metric = merge(x), merge(metric)
        even, odd = groups[::2], [list(g) for g in groups[1::2]]
        for s, d in zip(src.tolist(), dst.tolist()):
            odd[d] += even[s]
        groups = [even[u] for u in unmerged.tolist()] + odd
    return x, [sorted(g) for g in groups]


def naive_flow(layer, h, cos, sin, temperature=0.1, iterations=5):
    """AIM's PageRank importance over a Llama decoder layer's attention, head by head: h (L, D) the
    layer's input over the tokens present, cos/sin (1, L, d) their rotary embeddings."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    n, d = h.shape[0], attn.head_dim
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(n, -1, d).transpose(0, 1)[None]
    k = attn.k_proj(x).view(n, -1, d).transpose(0, 1)[None]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    q, k = q[0].double(), k[0].double().repeat_interleave(q.shape[1] // k.shape[1], dim=0)
    logits = (q @ k.transpose(1, 2)) * attn.scaling
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    scores = []
    for m in torch.softmax(logits / temperature, dim=-1):
        s = torch.full((n,), 1.0 / n, dtype=torch.float64)
        for _ in range(iterations):
            s = s @ m
        scores.append(s)
    return torch.stack(scores).square().mean(0).sqrt()


def naive_patch_entropy(rgb, patch):
    """VFlowOpt's patch entropy with a Python histogram per patch: rgb (3, H, W) in [0, 255]."""
    grey = (rgb.clamp(0, 255).floor().sum(0) / 3).round().long()
    rows, cols = grey.shape[0] // patch, grey.shape[1] // patch
    out = []
    for r in range(rows):
        for c in range(cols):
            values = grey[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch].flatten().tolist()
            counts = [values.count(v) for v in sorted(set(values))]
            out.append(-sum(k / len(values) * math.log2(k / len(values) + 1e-10) for k in counts))
    return torch.tensor(out)


def vflowopt_scores(eager_model, pixel_values, threshold, entropy=0.0):
    """VFlowOpt's importance of LLaVA-1.5's patches by hand, from the eager tower's returned attention at
    the feature layer: the mean attention row of the global tokens (receiving over ``threshold`` times
    the mean), plus ``entropy`` times the softmax of the patches' grey-level entropy."""
    tower = eager_model.model.vision_tower
    layer = eager_model.config.vision_feature_layer % len(tower.encoder.layers)
    with torch.no_grad():
        a = tower(pixel_values, output_attentions=True).attentions[layer][0].double().mean(0)
    received = a.mean(0)
    scores = a[received > threshold * received.mean()].mean(0)[1:]
    if entropy:
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
        rgb = (pixel_values[0].double() * std + mean) * 255
        scores = scores + entropy * torch.softmax(naive_patch_entropy(rgb, 14).double(), 0)
    return scores


def naive_facility_location(x, k, text=None, weight=0.0):
    """CATP's first stage written out: the greedy maximisation of sum_x max_y s(y, x) + weight x
    sum_y s(y, text), s the rescaled cosine (cos + 1) / 2, each candidate's gain computed in a loop,
    float64. Returns the picked indices, ascending."""
    u = torch.nn.functional.normalize(x.double(), dim=1)
    s = (u @ u.T + 1) / 2
    align = torch.zeros(x.shape[0], dtype=torch.float64)
    if text is not None:
        t = torch.nn.functional.normalize(text.double().mean(0), dim=0)
        align = (u @ t + 1) / 2
    chosen, cover = [], torch.zeros(x.shape[0], dtype=torch.float64)
    for _ in range(k):
        gains = {c: float((s[c] - cover).clamp_min(0).sum() + weight * align[c]) for c in range(x.shape[0])}
        best = max((c for c in gains if c not in chosen), key=lambda c: (gains[c], -c))
        chosen.append(best)
        cover = torch.maximum(cover, s[best])
    return torch.tensor(sorted(chosen))


def naive_instruction_relevance(x, text, negate=True):
    """CDPruner's relevance written out in float64: each token's mean cosine with the text rows,
    negated, min-max normalised over the tokens."""
    u = torch.nn.functional.normalize(x.double(), dim=1)
    t = torch.nn.functional.normalize(text.double(), dim=1)
    r = torch.tensor([sum(float(u[i] @ t[m]) for m in range(t.shape[0])) / t.shape[0] for i in range(u.shape[0])])
    r = -r if negate else r
    return (r - r.min()) / (r.max() - r.min())


def naive_conditional_dpp(x, quality, k):
    """The DPP's greedy MAP rule by its definition: each step adds the token that makes the determinant
    of the kernel diag(q) S diag(q) (S the cosine similarity) over the chosen tokens largest, each
    candidate's determinant computed afresh, float64. Returns the picked indices, ascending."""
    u = torch.nn.functional.normalize(x.double(), dim=1)
    q = quality.double()
    s = u @ u.T
    s.diagonal().fill_(1.0)
    kernel = q[:, None] * s * q[None, :]
    chosen = []
    for _ in range(k):
        dets = {
            c: float(torch.linalg.det(kernel[chosen + [c]][:, chosen + [c]]))
            for c in range(x.shape[0])
            if c not in chosen
        }
        chosen.append(max(dets, key=lambda c: (dets[c], -c)))
    return torch.tensor(sorted(chosen))
