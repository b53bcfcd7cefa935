"""Shared helpers of the attribution-quality evaluations (issue 7).

Everything runs on CPU in float64 through attrib's own Python API (fit_factors,
load_curvature, compute_query_gradients, the scoring stage's Scorer), so the
numbers measure the method, not float32 rounding.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from scipy import stats

from attrib.data import CorpusSpec, Query, iter_sequence_parts, load_queries, query_sequence, special_prefix
from attrib.distributed import World
from attrib.options import DEFAULT_DAMPING_SCALE
from attrib.curvature import load_curvature
from attrib.stages.fit import FitSettings, fit_factors
from attrib.memory import DENSE_BYTES
from attrib.models import find_tracked_layers, load_model, model_record
from attrib.preconditioned_gradients import QueryGradients, compute_query_gradients
from attrib.scoring import Scorer
from attrib.storage import StageDir
from attrib.synthetic import (generate_fact_corpus, generic_queries, train_causal_lm, train_tokenizer,
                              write_fact_corpus)

MAX_LENGTH = 128


@dataclass(frozen=True)
class Setup:
    """A planted-fact corpus and a small causal LM trained on it."""

    arch: str = "llama"
    n_facts: int = 20
    n_filler: int = 60
    seed: int = 0
    hidden: int = 16
    layers: int = 2
    vocab: int = 320
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    distractors: int = 0  # documents per fact repeating its prompt's words and object without stating it
    generic: int = 0  # extra queries completing filler sentences (no source document)
    schedule: str = "cosine"  # the learning rate's decay after warm-up (attrib.synthetic.LR_SCHEDULES)

    def name(self) -> str:
        extra = ((f"-d{self.distractors}" if self.distractors else "") + (f"-g{self.generic}" if self.generic else "")
                 + ("" if self.schedule == "cosine" else f"-{self.schedule}"))
        return (f"{self.arch}-f{self.n_facts}-n{self.n_filler}-s{self.seed}-h{self.hidden}-L{self.layers}"
                f"-v{self.vocab}-t{self.steps}{extra}")


def default_work() -> Path:
    from attrib.synthetic import cache_dir

    return cache_dir() / "eval"


def build_setup(setup: Setup, root: Path) -> Path:
    """Corpus, queries, tokenizer and trained model in root/<name> (cached: built once)."""
    directory = Path(root) / setup.name()
    if (directory / "model" / "config.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    corpus = generate_fact_corpus(setup.n_facts, setup.n_filler, setup.seed, setup.distractors)
    corpus.queries += generic_queries(setup.generic, setup.seed)
    write_fact_corpus(corpus, directory)
    texts = [d["text"] for d in corpus.documents]
    tokenizer = train_tokenizer(texts, setup.vocab, directory / "tokenizer")
    started = time.perf_counter()
    train_causal_lm(setup.arch, tokenizer, texts, directory / "model", hidden_size=setup.hidden,
                    num_layers=setup.layers, steps=setup.steps, seq_len=MAX_LENGTH,
                    batch_size=setup.batch_size, lr=setup.lr, seed=setup.seed, schedule=setup.schedule)
    (directory / "train.json").write_text(json.dumps({"train_seconds": time.perf_counter() - started}))
    return directory


class Attributor:
    """A model, its corpus sequences and queries, and attrib's scores for them."""

    def __init__(self, setup_dir: Path, work: Path, model_dir: Path | None = None):
        self.setup_dir = Path(setup_dir)
        self.work = Path(work)
        self.model_dir = Path(model_dir or self.setup_dir / "model")
        model, tokenizer = load_model(str(self.model_dir), "float32", "cpu")
        self.model = model.double()
        self.tokenizer = tokenizer
        self.layers = find_tracked_layers(self.model)
        self.record = model_record(str(self.model_dir), self.model, self.layers)
        self.corpus = CorpusSpec(str(self.setup_dir / "corpus.jsonl"), id_field="id")
        self.queries = load_queries(self.setup_dir / "queries.jsonl")
        rows = [json.loads(line) for line in open(self.setup_dir / "queries.jsonl", encoding="utf-8")]
        self.source_doc = {str(r["id"]): r.get("source_doc") for r in rows}  # None for generic queries
        self.distractor_docs = {str(r["id"]): r.get("distractor_docs", []) for r in rows}
        parts = iter_sequence_parts(self.corpus, tokenizer, MAX_LENGTH, 10**9)
        self.sequences = [seq for part in parts for _, seq in part.sequences]
        self.doc_ids = list(dict.fromkeys(seq.doc_id for seq in self.sequences))
        self.doc_index = {d: i for i, d in enumerate(self.doc_ids)}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.num_params = sum(l.num_params for l in self.layers)

    def shapes(self) -> dict:
        return {"model_type": self.model.config.model_type, "tracked_params": self.num_params,
                "layers": [f"{l.name} [{l.d_out}x{l.d_in_folded}]" for l in self.layers],
                "documents": len(self.doc_ids), "sequences": len(self.sequences), "queries": len(self.queries),
                "tokens": sum(len(s) for s in self.sequences)}

    def fit(self, strategy: str, fisher: str = "true", samples: int = 1, seed: int = 0,
            covariance_max_tokens: int | None = None) -> Path:
        settings = FitSettings(strategy=strategy, fisher=fisher, fisher_samples=samples, max_length=MAX_LENGTH,
                               stats_dtype="float64", seed=seed, covariance_max_tokens=covariance_max_tokens)
        tag = self.record["fingerprint"][:12]
        sample = f"-cov{covariance_max_tokens}" if covariance_max_tokens else ""
        path = self.work / f"factors-{tag}-{strategy}-{fisher}{samples}-seed{seed}{sample}"
        stage = StageDir(path, "fit-factors", asdict(settings), self.record)
        if not stage.already_complete:
            fit_factors(self.model, self.tokenizer, self.layers, self.corpus, stage, settings, World())
        return path

    def scores(self, factors: Path, damping_scale: float | None = None, rank: int = 0,
               queries: list[Query] | None = None, damping: float | None = None) -> np.ndarray:
        """attrib's influence [queries, documents]; damping_scale c sets λ_l = c × mean(Λ_l) (None: attrib's 0.1),
        an absolute `damping` λ overrides it for every layer."""
        return self.scores_many([(factors, damping_scale, damping)], rank, queries)[0]

    def scores_many(self, settings, rank: int = 0, queries: list[Query] | None = None) -> list[np.ndarray]:
        """scores() for each (factors, damping_scale, damping) of `settings`, in one pass over the corpus:
        the settings' query gradients are stacked as one query set, so documents' gradients are formed once."""
        queries = queries or self.queries
        per_pass = max(1, DENSE_BYTES // (len(queries) * self.num_params * 8))  # every layer's P_q dense
        if len(settings) > per_pass:
            return [s for i in range(0, len(settings), per_pass)
                    for s in self.scores_many(settings[i:i + per_pass], rank, queries)]
        parts = []
        for factors, damping_scale, damping in settings:
            curvature = load_curvature(str(factors), self.layers, damping,
                                       damping_scale=damping_scale or DEFAULT_DAMPING_SCALE)
            parts.append(compute_query_gradients(self.model, self.tokenizer, self.layers, queries, curvature, rank,
                                                 MAX_LENGTH, 4096, "cpu"))
        gradients = QueryGradients([f"{i}:{q}" for i, p in enumerate(parts) for q in p.query_ids],
                                   parts[0].layer_names,
                                   *[[torch.cat([getattr(p, field)[l] for p in parts]) for l in range(len(self.layers))]
                                     for field in ("left", "sigma", "right")])
        scorer = Scorer(self.model, self.layers, gradients, "cpu")
        out = np.zeros((len(gradients.query_ids), len(self.doc_ids)))
        batch = 32
        for start in range(0, len(self.sequences), batch):
            chunk = self.sequences[start:start + batch]
            _, per_layer = scorer.score(chunk, self.pad_id, "cpu", tokens=False)
            totals = per_layer.sum(-1).double().numpy()  # [batch, Q × settings]
            for seq, row in zip(chunk, totals):
                out[:, self.doc_index[seq.doc_id]] += row
        return list(out.reshape(len(settings), len(queries), len(self.doc_ids)))

    # --- dense references -------------------------------------------------

    def _params(self):
        params = []
        for layer in self.layers:
            params.append(layer.module.weight)
            if layer.has_bias:
                params.append(layer.module.bias)
        return params

    def _flatten(self, grads) -> torch.Tensor:
        pieces, i = [], 0
        for layer in self.layers:
            g = grads[i].t() if layer.transposed else grads[i]
            i += 1
            if layer.has_bias:
                g = torch.cat([g, grads[i][:, None]], dim=1)
                i += 1
            pieces.append(g.reshape(-1))  # row-major vec of [d_out, d_in_folded], as attrib
        return torch.cat(pieces).double()

    def gradients(self, sequences, fisher_samples: int = 0, seed: int = 0):
        """Per-sequence summed-NLL gradients [n, P] with the data's labels; with fisher_samples K > 0
        also the sampled-label Fisher Σ_n (1/K) Σ_k g g^T / n [P, P] (labels from the model)."""
        params = self._params()
        for p in params:
            p.requires_grad_(True)
        generator = torch.Generator().manual_seed(seed)
        rows, fisher, sampled = [], None, []

        def accumulate(fisher):  # Σ g gᵀ over the buffered sampled gradients, one GEMM per 256 of them
            S = torch.stack(sampled)
            sampled.clear()
            return S.T @ S if fisher is None else fisher.addmm_(S.T, S)

        try:
            for seq in sequences:
                targets = torch.tensor([seq.targets])
                logp = torch.log_softmax(self.model(input_ids=torch.tensor([seq.input_ids])).logits.double(), -1)
                valid = targets >= 0
                loss = -(logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * valid).sum()
                rows.append(self._flatten(torch.autograd.grad(loss, params, retain_graph=fisher_samples > 0)))
                if fisher_samples:
                    positions = valid[0].nonzero()[:, 0]
                    probs = logp[0, positions].detach().exp()
                    for k in range(fisher_samples):
                        labels = torch.multinomial(probs, 1, generator=generator)[:, 0]
                        loss_k = -logp[0, positions, labels].sum()
                        sampled.append(self._flatten(torch.autograd.grad(loss_k, params,
                                                                         retain_graph=k < fisher_samples - 1)))
                        if len(sampled) == 256:
                            fisher = accumulate(fisher)
        finally:
            for p in params:
                p.requires_grad_(False)
        G = torch.stack(rows)
        if sampled:
            fisher = accumulate(fisher)
        if fisher is not None:
            fisher /= len(sequences) * fisher_samples
        return G, fisher

    def query_gradients(self, queries=None) -> torch.Tensor:
        prefix = special_prefix(self.tokenizer)
        seqs = [query_sequence(self.tokenizer, q, MAX_LENGTH, prefix) for q in (queries or self.queries)]
        return self.gradients(seqs)[0]

    def layer_slices(self):
        out, start = [], 0
        for layer in self.layers:
            out.append(slice(start, start + layer.num_params))
            start += layer.num_params
        return out

    def doc_matrix(self, G: torch.Tensor) -> torch.Tensor:
        """Sum sequence gradients into document gradients [docs, P]."""
        D = torch.zeros(len(self.doc_ids), G.shape[1], dtype=G.dtype)
        for seq, g in zip(self.sequences, G):
            D[self.doc_index[seq.doc_id]] += g
        return D


def exact_influence(V: torch.Tensor, D: torch.Tensor, fisher: torch.Tensor, slices, scale: float = 0.1,
                    block_diagonal: bool = False) -> np.ndarray:
    """vec(V_q)ᵀ (F + Λ_damp)⁻¹ vec(G_m) with per-layer damping λ_l = scale × tr(F_ll)/P_l.

    tr(F_ll)/P_l is the mean eigenvalue of layer l's block of F; it equals the mean of
    EK-FAC's Λ_l when Λ is estimated from the same gradients, so scale 0.1 matches
    attrib's default λ = 0.1 × mean(Λ).
    """
    H = fisher.clone()
    if block_diagonal:
        mask = torch.zeros_like(H, dtype=torch.bool)
        for s in slices:
            mask[s, s] = True
        H[~mask] = 0
    for s in slices:
        diag = torch.diagonal(H)[s]
        diag += scale * float(torch.diagonal(fisher)[s].mean())
    L = torch.linalg.cholesky(H)
    X = torch.cholesky_solve(D.T.contiguous(), L)  # [P, docs]
    return (V @ X).numpy()


def correlations(predicted: np.ndarray, reference: np.ndarray) -> dict:
    """Per-query Pearson and Spearman over documents, and their means."""
    pearson, spearman = [], []
    for p, r in zip(predicted, reference):
        pearson.append(float(stats.pearsonr(p, r)[0]))
        spearman.append(float(stats.spearmanr(p, r)[0]))
    return {"pearson": float(np.nanmean(pearson)), "spearman": float(np.nanmean(spearman)),
            "pearson_min": float(np.nanmin(pearson)), "per_query_pearson": pearson, "per_query_spearman": spearman}


def prefilter_scores(att: Attributor, scoring: str, work: Path) -> np.ndarray:
    """TF-IDF or BM25 scores [queries, documents] from attrib's prefilter (0 where a document shares no term)."""
    from attrib.stages.prefilter import load_candidates, run_prefilter

    out = Path(work) / f"prefilter-{att.setup_dir.name}-{scoring}"
    run_prefilter(att.corpus, att.setup_dir / "queries.jsonl", out, top_k=len(att.doc_ids), scoring=scoring)
    candidates = load_candidates(out)
    scores = np.zeros((len(att.queries), len(att.doc_ids)))
    for qi, q in enumerate(att.queries):
        for c in candidates.get(q.query_id, []):
            scores[qi, att.doc_index[c.doc_id]] = c.score
    return scores


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path, obj) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)
