"""Which tokens share a sentence: the first attention layer's query/key gradients, read per token.

Softmax attention ties a token's query gradient to its own sentence's keys. Per head h,

    dL/dq_a = sum_{b in sentence(a)} dS_ab k_b / sqrt(d_h)      with  sum_b dS_ab = 0,

so ``dq_a`` lies in the span of its sentence's key differences ``k_b - k_0``, and likewise ``dk_b`` in the span of its
sentence's queries. A sentence of L < d_h tokens spans only L of d_h dimensions per head, so the test is sharp
(relative residual about 1e-7 for the right sentence, 1e-2 or more with one wrong token in our measurements on MiniLM)
and it grades: each wrong token removes one needed direction. Unlike the second layer's span, it scores a sentence
from its (token, position) pairs alone, without running the first layer.

The per-token gradients come without knowing which token sits where: the first layer's inputs are
``LayerNorm(E[t] + P[p] + T[k]) = gamma * centre(E[t] + P[p] + T[k]) / sigma + beta``, combinations of a few
generators, so the query weight gradient ``sum_a dq_a x_a^T`` splits uniquely over those generators (the bag's word
rows, the position rows, the type rows and beta). A token that occurs once in the batch owns its word generator's
coefficient: ``dq_a / sigma_a``, the direction the test needs.
"""

from __future__ import annotations

import torch

from textleak.attacks.span_scoring import EmbeddingParts, first_attention, first_layer_inputs, qkv_gradient_names
from textleak.update import Update


class AttentionTest:
    """Relative residual of a token's first-layer query/key gradients against a candidate sentence's keys/queries."""

    def __init__(
        self,
        parts: EmbeddingParts,
        bag: list[int],
        positions: int,
        types: list[int],
        *,
        query: torch.nn.Linear,
        key: torch.nn.Linear,
        heads: int,
        grad_query: torch.Tensor,
        grad_key: torch.Tensor,
    ) -> None:
        self.heads = heads
        self.head_size = query.out_features // heads
        # keys and queries of every (bag token, position) pair, looked up by sentence
        n = len(bag)
        x = first_layer_inputs(
            parts,
            torch.tensor(bag).repeat_interleave(positions),
            torch.arange(positions).repeat(n),
            torch.full((n * positions,), types[0], dtype=torch.long),
        )
        w_query, w_key = (m.weight.detach().to(torch.float64) for m in (query, key))
        self.keys = (x @ w_key.T).view(n, positions, -1)
        self.queries = (x @ w_query.T + query.bias.detach().to(torch.float64)).view(n, positions, -1)
        self.lookup = torch.full((parts.word.shape[0],), -1, dtype=torch.long)
        self.lookup[torch.tensor(bag)] = torch.arange(n)

        def centred(rows: torch.Tensor) -> torch.Tensor:
            return parts.gamma * (rows - rows.mean(-1, keepdim=True))

        generators = torch.cat(
            [
                centred(parts.word[bag]),
                centred(parts.position[:positions]),
                centred(parts.token_type[types]),
                parts.beta[None],
            ]
        )
        inverse = torch.linalg.pinv(generators)
        self.column = {t: i for i, t in enumerate(bag)}
        # (bag, d): per token, the sum over its occurrences of dq / sigma (and dk / sigma)
        self.grad_query = (grad_query.to(torch.float64) @ inverse)[:, :n].T
        self.grad_key = (grad_key.to(torch.float64) @ inverse)[:, :n].T

    def knows(self, token: int) -> bool:
        """Whether ``token`` is in the bag the test was built for (only those can be scored)."""
        return 0 <= token < len(self.lookup) and int(self.lookup[token]) >= 0

    def usable(self, length: int) -> bool:
        """Whether sentences of ``length`` tokens leave room in a head (L - 1 key differences < head size)."""
        return length - 1 < self.head_size

    def residual(self, tokens: list[int], sentences: torch.Tensor) -> torch.Tensor:
        """(n, m): for candidate sentences (n, L) and tokens (m), the relative residual of each token's query
        gradient against the sentence's key differences and of its key gradient against the sentence's queries,
        over all heads. A token's residual is near zero only in its own, complete sentence."""
        n, length = sentences.shape
        columns = self.lookup[sentences]
        if bool((columns < 0).any()):
            raise ValueError("a candidate sentence holds a token outside the bag the attention test was built for")
        at = torch.arange(length).expand(n, length)
        keys, queries = self.keys[columns, at], self.queries[columns, at]
        rows = [self.column[t] for t in tokens]
        gq = self.grad_query[rows].view(len(rows), self.heads, self.head_size)
        gk = self.grad_key[rows].view(len(rows), self.heads, self.head_size)
        rest = self._outside(keys[:, 1:] - keys[:, :1], gq)
        norm = gq.square().sum(dim=(1, 2))
        if length < self.head_size:
            rest = rest + self._outside(queries, gk)
            norm = norm + gk.square().sum(dim=(1, 2))
        return (rest / norm.clamp_min(1e-300)).sqrt()

    def confirms(self, sentence: list[int] | tuple[int, ...], anchors: set[tuple[int, int]], accept: float) -> bool:
        """Whether a candidate sentence is consistent with the anchors it holds ((token, position) pairs of tokens
        seen once): true when it holds none the test can read, or when at least one has a residual <= ``accept``.

        One anchor suffices: a token seen twice at the same position also looks like an anchor, and its residual
        mixes both sentences; a wrong sentence (a prefix of a true one, say) fails at every anchor it holds.
        """
        held = sorted({t for t, p in anchors if p < len(sentence) and sentence[p] == t and self.knows(t)})
        if not held or not self.usable(len(sentence)) or not all(self.knows(t) for t in sentence):
            return True
        return bool((self.residual(held, torch.tensor([list(sentence)]))[0] <= accept).any())

    def greedy(self, token: int, options: list[list[int]]) -> list[int]:
        """A sentence built around ``token`` by forward selection (group orthogonal matching pursuit over heads).

        Starting from the positions with a single option, repeatedly fill the open position and candidate whose key
        (and query) directions remove the most of the token's remaining query (and key) gradient; large attention
        coefficients are picked first, and wrong tokens, random directions in a head, remove little.
        """
        length = len(options)
        sentence = [tokens[0] for tokens in options]
        open_positions = {p for p, tokens in enumerate(options) if len(tokens) > 1}
        sides = [(self.keys, self.grad_query, True)]
        if length < self.head_size:
            sides.append((self.queries, self.grad_key, False))
        states = []
        for table, grads, differences in sides:
            rest = grads[self.column[token]].view(self.heads, self.head_size).clone()
            origin = table[self.lookup[sentence[0]], 0].view(self.heads, self.head_size) if differences else 0
            basis = torch.zeros(self.heads, self.head_size, 0, dtype=torch.float64)
            fixed = [p for p in range(length) if p not in open_positions and (p > 0 or not differences)]
            states.append([table, differences, origin, basis, rest / rest.norm()])
            for p in fixed:
                self._extend(states[-1], table[self.lookup[sentence[p]], p].view(1, self.heads, self.head_size))
        while open_positions:
            best = (-1.0, -1, -1)
            for p in open_positions:
                ids = torch.tensor(options[p])
                gain = torch.zeros(len(ids), dtype=torch.float64)
                for state in states:
                    table, _, origin, basis, rest = state
                    directions = table[self.lookup[ids], p].view(len(ids), self.heads, self.head_size) - origin
                    inside = torch.einsum("hdr,nhr->nhd", basis, torch.einsum("hdr,nhd->nhr", basis, directions))
                    directions = directions - inside
                    lengths = directions.square().sum(-1).clamp_min(1e-300)
                    gain += ((directions * rest[None]).sum(-1).square() / lengths).sum(-1)
                k = int(gain.argmax())
                if float(gain[k]) > best[0]:
                    best = (float(gain[k]), p, options[p][k])
            _, p, chosen = best
            sentence[p] = chosen
            open_positions.discard(p)
            for state in states:
                table = state[0]
                self._extend(state, table[self.lookup[chosen], p].view(1, self.heads, self.head_size))
        return sentence

    @staticmethod
    def _extend(state: list, direction: torch.Tensor) -> None:
        """Add one direction (1, H, d_h) to a side's per-head basis and take it out of the remaining gradient."""
        _, differences, origin, basis, rest = state
        vector = direction[0] - origin if differences else direction[0]
        vector = vector - torch.einsum("hdr,hr->hd", basis, torch.einsum("hdr,hd->hr", basis, vector))
        unit = vector / vector.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        state[3] = torch.cat([basis, unit[:, :, None]], dim=-1)
        state[4] = rest - unit * (unit * rest).sum(-1, keepdim=True)

    def _outside(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(n, m): squared norm, summed over heads, of each target (m, heads, d_h) outside each sentence's per-head
        row span (rows: n, count, d)."""
        n, count, _ = rows.shape
        per_head = rows.view(n, count, self.heads, self.head_size).permute(0, 2, 3, 1)  # (n, H, d_h, count)
        basis, _ = torch.linalg.qr(per_head)
        columns = targets.permute(1, 2, 0)[None]  # (1, H, d_h, m)
        outside = columns - basis @ (basis.transpose(-1, -2) @ columns)
        return outside.square().sum(dim=(1, 2))


def attention_test(
    model: torch.nn.Module, update: Update, parts: EmbeddingParts, bag: list[int], positions: int, types: list[int]
) -> AttentionTest | None:
    """The test for the first layer, or None when its query/key gradients or modules cannot be found by name."""
    names = qkv_gradient_names(model, 0)
    found = first_attention(model)
    if found is None or len(names) < 2 or not bag:
        return None
    heads, projections = found
    query, key = projections.get("query"), projections.get("key")
    if query is None or key is None or query.bias is None:
        return None
    grads = [update.gradients.get(name) for name in names[:2]]
    if grads[0] is None or grads[1] is None:
        return None
    return AttentionTest(
        parts,
        bag,
        positions,
        types,
        query=query,
        key=key,
        heads=heads,
        grad_query=grads[0],
        grad_key=grads[1],
    )
