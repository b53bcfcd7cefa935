"""LDS of attrib's influence on real text: Debian's fortune cookies (issue 14, item 3).

Corpus: the fortune files of Debian bookworm's `fortunes` and `fortunes-min` packages, version
1:1.99.1-7.3 (quotations, jokes and verse, BSD-licensed, not written for this project). Fetched
without root, into any directory:

    apt-get download fortunes fortunes-min
    for f in fortunes*.deb; do dpkg -x "$f" pkg; done      # files in pkg/usr/share/games/fortunes

Every file there is cut at its "%" lines; each fortune's whitespace is collapsed to single spaces.
Fortunes of 80–320 characters are kept, exact duplicates dropped, the rest sorted and shuffled with
a fixed seed: the first --queries become held-out queries (prompt = first half of the words,
completion = the rest), the next --docs the training corpus. So no query is a training document
and influence measures generalisation, not recall. A byte-level BPE tokenizer and a Llama are
trained on the documents as in scripts/eval/lds.py; the LDS protocol is lds.py's (M subset models
on random halves, seed 1000 + j, same recipe; Spearman of predicted vs actual log p(completion)).

Rows (the defaults study): damping c × mean(Λ) for c = 0.1 (attrib's default), 0.01, 0.001 and the
absolute λ = 1e-8 (kronfluence's library default), each with the true Fisher (1 label sample) and
the empirical Fisher; identity and kfac for reference. With --kit plain|distractors the same rows
run on lds.py's synthetic kits (same setups and subset-model cache as lds.py). Each LDS comes with a
95% bootstrap interval over queries, and the difference to the default with a paired interval.

With --exact K (models of a few thousand tracked parameters) the dense exact references are added:
influence under the dense damped Gauss-Newton matrix (sampled-label Fisher, K labels per token) and
the dense empirical Fisher over all tracked layers together — the ceiling of any better solve — and
each row's agreement with them; with --cg-tokens N the rows of EK-FAC + k steps of attrib's CG solve
(attrib/solve.py) on an N-token solve sample, k from --cg-iterations. Subset models, factors, the
dense matrices and the CG solves are cached under --work. Figures: docs/benchmarks.md, "Defaults
chosen on real text (issue 14)" and "CG solve: LDS vs iterations".

    python scripts/eval/realtext.py --fortunes pkg/usr/share/games/fortunes --hidden 16 --exact 4 \
        --cg-tokens 2048 --jobs 3 --out scripts/eval/results/realtext-h16.json
    python scripts/eval/realtext.py --kit plain --arch llama --jobs 2 --out scripts/eval/results/defaults-plain-llama.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attrib.options import DEFAULT_DAMPING_SCALE  # noqa: E402
from attrib.solve import DEFAULT_SYSTEM  # noqa: E402
from attrib.storage import load_tensors, tensor_metadata, write_tensors  # noqa: E402

import lds  # noqa: E402
from common import (MAX_LENGTH, Attributor, Setup, build_setup, correlations, default_work,  # noqa: E402
                    exact_influence, log, markdown_table, write_json)

FORTUNES_PACKAGES = "fortunes 1:1.99.1-7.3, fortunes-min 1:1.99.1-7.3 (Debian bookworm)"
MIN_CHARS, MAX_CHARS = 80, 320


def split_fortunes(text: str) -> list[str]:
    """The fortunes of one strfile source: blocks between lines that are exactly "%", whitespace collapsed."""
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            blocks.append(" ".join(current))
            current = []
        else:
            current.append(line)
    blocks.append(" ".join(current))
    return [re.sub(r"\s+", " ", b).strip() for b in blocks if b.strip()]


def halve(text: str) -> tuple[str, str]:
    """Prompt = the first half of the words, completion = the rest with its leading space."""
    words = text.split(" ")
    half = len(words) // 2
    return " ".join(words[:half]), " " + " ".join(words[half:])


def split_corpus(fortunes: list[str], num_docs: int, num_queries: int, seed: int = 0):
    """Documents and held-out queries from fortunes: length filter, exact duplicates dropped,
    sorted and shuffled with `seed`; the first num_queries are queries, the next num_docs documents."""
    kept = sorted({f for f in fortunes if MIN_CHARS <= len(f) <= MAX_CHARS and len(f.split(" ")) >= 8})
    random.Random(seed).shuffle(kept)
    if len(kept) < num_docs + num_queries:
        raise ValueError(f"only {len(kept)} fortunes of {MIN_CHARS}-{MAX_CHARS} characters; "
                         f"{num_docs + num_queries} needed")
    queries = []
    for i, text in enumerate(kept[:num_queries]):
        prompt, completion = halve(text)
        queries.append({"id": f"h-{i:04d}", "prompt": prompt, "completion": completion})
    documents = [{"id": f"f-{i:05d}", "text": t} for i, t in enumerate(kept[num_queries:num_queries + num_docs])]
    return documents, queries


def read_fortunes(directory: Path) -> list[str]:
    """Every fortune of the strfile sources in `directory` (the .dat indexes and .u8 links skipped), in file-name order."""
    out = []
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and not path.is_symlink() and path.suffix not in (".dat", ".u8"):
            out += split_fortunes(path.read_text(encoding="utf-8", errors="replace"))
    return out


@dataclass(frozen=True)
class RealSetup:
    """The fortunes kit: corpus sizes and the model recipe (fields lds.train_subset reads)."""

    arch: str = "llama"
    docs: int = 2000
    queries: int = 40
    seed: int = 0
    hidden: int = 64
    layers: int = 2
    vocab: int = 1024
    steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    schedule: str = "cosine"  # the learning rate's decay after warm-up (attrib.synthetic.LR_SCHEDULES)

    def name(self) -> str:
        return (f"fortunes-{self.arch}-d{self.docs}-q{self.queries}-s{self.seed}-h{self.hidden}-L{self.layers}"
                f"-v{self.vocab}-t{self.steps}" + ("" if self.schedule == "cosine" else f"-{self.schedule}"))


def build_realtext(setup: RealSetup, fortunes_dir: Path, root: Path) -> Path:
    """Corpus, held-out queries, tokenizer and trained model in root/<name> (cached: built once)."""
    from attrib.synthetic import train_causal_lm, train_tokenizer

    directory = Path(root) / setup.name()
    if (directory / "model" / "config.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    documents, queries = split_corpus(read_fortunes(fortunes_dir), setup.docs, setup.queries, setup.seed)
    for name, rows in (("corpus", documents), ("queries", queries)):
        with open(directory / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    texts = [d["text"] for d in documents]
    tokenizer = train_tokenizer(texts, setup.vocab, directory / "tokenizer")
    started = time.perf_counter()
    train_causal_lm(setup.arch, tokenizer, texts, directory / "model", hidden_size=setup.hidden,
                    num_layers=setup.layers, steps=setup.steps, seq_len=MAX_LENGTH,
                    batch_size=setup.batch_size, lr=setup.lr, seed=setup.seed, schedule=setup.schedule)
    digest = hashlib.sha256((directory / "corpus.jsonl").read_bytes()).hexdigest()
    (directory / "train.json").write_text(json.dumps({"train_seconds": time.perf_counter() - started,
                                                      "corpus_sha256": digest, "packages": FORTUNES_PACKAGES}))
    return directory


def bootstrap(per_query: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over queries, resampling queries."""
    rng = np.random.default_rng(seed)
    means = per_query[rng.integers(0, len(per_query), (draws, len(per_query)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


# (label, fit strategy, fisher, damping scale c, absolute damping λ); c applies when λ is None
DEFAULTS_GRID = [
    ("c=0.1, true (default)", "ekfac", "true", 0.1, None),
    ("c=0.01, true", "ekfac", "true", 0.01, None),
    ("c=0.001, true", "ekfac", "true", 0.001, None),
    ("λ=1e-8, true", "ekfac", "true", None, 1e-8),
    ("c=0.1, empirical", "ekfac", "empirical", 0.1, None),
    ("c=0.01, empirical", "ekfac", "empirical", 0.01, None),
    ("c=0.001, empirical", "ekfac", "empirical", 0.001, None),
    ("λ=1e-8, empirical (kronfluence's damping)", "ekfac", "empirical", None, 1e-8),
    ("kfac, c=0.1, true", "kfac", "true", 0.1, None),
    ("identity", "identity", "true", 0.1, None),
]


# lds.py's synthetic kits, and the plain one with a model small enough for the dense references
# (hidden 16: 6,144 tracked weights, so the dense GN and empirical Fisher are 6,144²)
SYNTHETIC_KITS = {"plain": ("plain", lds.MODEL), "distractors": ("distractors", lds.MODEL),
                  "plain-h16": ("plain", {"hidden": 16, "layers": 2, "vocab": 320, "steps": 300, "batch_size": 16,
                                        "lr": 3e-3})}


KIT_FIELDS = ("hidden", "docs", "steps", "seed", "schedule")  # RealSetup fields an evaluation may set


def add_kit_arguments(parser, default_kit: str) -> None:
    """The options naming a kit, as `open_kit_of` reads them (a field left out takes RealSetup's default)."""
    parser.add_argument("--kit", default=default_kit, help="fortunes, or lds.py's synthetic plain / distractors")
    parser.add_argument("--arch", default="llama")
    parser.add_argument("--fortunes", default=None, help="the fortune files (see realtext.py's docstring)")
    parser.add_argument("--hidden", type=int, default=None, help="fortunes: model width (default RealSetup's)")
    parser.add_argument("--docs", type=int, default=None, help="fortunes: training documents (default RealSetup's)")
    parser.add_argument("--steps", type=int, default=None, help="fortunes: training steps (default RealSetup's)")
    parser.add_argument("--seed", type=int, default=None,
                        help="fortunes: the kit's seed (its draw of documents and queries, and the model's init)")
    parser.add_argument("--schedule", default=None, help="the kit's learning-rate schedule (default cosine)")


def open_kit_of(parser, args, work: Path):
    """`open_kit` of the options `add_kit_arguments` added."""
    if args.kit == "fortunes" and not args.fortunes:
        parser.error("--kit fortunes needs --fortunes DIR")
    return open_kit(args.kit, args.arch, work, args.fortunes, **{name: getattr(args, name) for name in KIT_FIELDS})


def open_kit(kit: str, arch: str, work: Path, fortunes: str | None = None, **real):
    """(setup, Attributor, each query's kind) of the fortunes real-text kit (RealSetup fields in `real`, None for
    RealSetup's default) or of a synthetic kit of SYNTHETIC_KITS (`real`'s schedule only), built into `work` once
    and cached."""
    if kit == "fortunes":
        setup = RealSetup(arch=arch, **{name: value for name, value in real.items() if value is not None})
        att = Attributor(build_realtext(setup, Path(fortunes), work), work)
        return setup, att, ["held-out"] * len(att.queries)
    corpus, model = SYNTHETIC_KITS[kit]
    setup = Setup(arch=arch, **lds.CORPORA[corpus], **model, schedule=real.get("schedule") or "cosine")
    att = Attributor(build_setup(setup, work), work)
    return setup, att, ["fact" if att.source_doc[q.query_id] else "generic" for q in att.queries]


@dataclass
class Dense:
    """Float64 dense quantities over all tracked weights: document gradients D [docs, P], query gradients
    V [Q, P], the GN estimate (true Fisher, K labels per token) and the empirical Fisher [P, P]."""

    D: torch.Tensor
    V: torch.Tensor
    gauss_newton: torch.Tensor
    empirical: torch.Tensor
    slices: list

    @classmethod
    def of(cls, att: Attributor, samples: int) -> "Dense":
        """Formed once per model and K, then read from the work directory."""
        path = att.work / f"dense-{att.record['fingerprint'][:12]}-K{samples}.safetensors"
        if path.is_file():
            return cls(**load_tensors(path), slices=att.layer_slices())
        G, F_true = att.gradients(att.sequences, fisher_samples=samples, seed=12345)
        parts = dict(D=att.doc_matrix(G), V=att.query_gradients(), gauss_newton=F_true,
                     empirical=G.T @ G / len(att.sequences))
        write_tensors(path, parts)
        return cls(**parts, slices=att.layer_slices())

    def influence(self, F: torch.Tensor, dampings: list[float]) -> np.ndarray:
        """vec(V_q)ᵀ (F + diag(λ_l))⁻¹ vec(D_m) with the given per-layer λ_l."""
        H = F.clone()
        for s, damping in zip(self.slices, dampings):
            torch.diagonal(H)[s] += damping
        return (self.V @ torch.cholesky_solve(self.D.T.contiguous(), torch.linalg.cholesky(H))).numpy()


def dense_references(dense: Dense, samples: int, scales=(0.1, 0.01, 0.001)) -> dict:
    """Exact influence [Q, D] over all tracked layers together (cross-layer blocks kept), per (fisher, c):
    the dense damped Gauss-Newton matrix ("true": the Fisher with `samples` labels drawn from the model
    per token, an unbiased estimate of Jᵀ H_out J) and the dense empirical Fisher, λ_l = c × tr(F_ll)/P_l."""
    return {(fisher, c): exact_influence(dense.V, dense.D, F, dense.slices, c)
            for fisher, F in (("true", dense.gauss_newton), ("empirical", dense.empirical)) for c in scales}


def cg_iterates(system, precondition, b: list[torch.Tensor], checkpoints: tuple[int, ...]):
    """{k: x_k} of one run of attrib.solve.preconditioned_cg for each k of `checkpoints`, and the
    relative residuals [max k + 1, Q]: one run instead of one per iteration count."""
    from attrib.solve import preconditioned_cg

    out = {}

    def keep(k, x):
        if k in checkpoints:
            out[k] = x

    _, residuals = preconditioned_cg(system, precondition, b, max(checkpoints), keep)
    return out, residuals


def cg_solve(att: Attributor, solve_tokens: int, checkpoints: tuple[int, ...], fisher: str = "empirical",
             system: str = DEFAULT_SYSTEM, damping_scale: float = DEFAULT_DAMPING_SCALE) -> dict:
    """Scores [Q, docs] of EK-FAC + k CG steps on (C_sample + λ_l) x = ∇L_q for each k of `checkpoints`
    (one PCG run, EK-FAC factors of `fisher` as preconditioner, C the sample's `system`, attrib's
    λ_l = c × mean(Λ_l)), the mean relative residuals and the solve's cost; cached in the work
    directory (a solve takes minutes)."""
    from attrib.curvature import load_curvature
    from attrib.solve import SYSTEMS, CGSolver, SolveSample

    factors, product = att.fit("ekfac", fisher), SYSTEMS[system]
    path = att.work / (f"cg-{att.record['fingerprint'][:12]}-{fisher}-{system}-t{solve_tokens}-c{damping_scale:g}-"
                       + "-".join(map(str, checkpoints)) + ".safetensors")
    if path.is_file():
        return _read_cg_result(path)
    curvature = load_curvature(str(factors), att.layers, None, damping_scale=damping_scale)
    sample = SolveSample.read(att.corpus, att.tokenizer, MAX_LENGTH, solve_tokens)
    solver = CGSolver(curvature, product(att.model, att.layers, sample, 4096, att.pad_id, "cpu"), 1, "cpu",
                      torch.float64)
    V, slices = att.query_gradients(), att.layer_slices()
    b = [V[:, s].reshape(-1, layer.d_out, layer.d_in_folded) for s, layer in zip(slices, att.layers)]
    t0 = time.perf_counter()
    iterates, residuals = cg_iterates(solver._system, solver._precondition, b, checkpoints)
    seconds = time.perf_counter() - t0
    D = att.doc_matrix(att.gradients(att.sequences)[0])
    result = {"scores": {k: _flat(x) @ D.T for k, x in iterates.items()},
              "residuals": residuals.mean(1).tolist(),
              "dampings": [curvature.damping_of(i) for i in range(len(att.layers))],
              "cost": {"system": system, "solve_tokens": sample.tokens, "solve_sequences": sample.sequences,
                       "iterations": max(checkpoints), "products": max(checkpoints) + 1,
                       "seconds": round(seconds, 1), "seconds_per_product": round(seconds / (max(checkpoints) + 1), 2)}}
    write_tensors(path, {f"scores.{k}": scores for k, scores in result["scores"].items()},
                  {key: json.dumps(result[key]) for key in ("residuals", "dampings", "cost")})
    return result


def _flat(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """Per layer [Q, d_out, d_in(+1)] → [Q, P] (row-major per layer, the dense order)."""
    return torch.cat([x.reshape(x.shape[0], -1) for x in per_layer], dim=1)


def _read_cg_result(path: Path) -> dict:
    """cg_solve's cached result: scores per checkpoint as tensors, the rest as JSON metadata."""
    metadata = tensor_metadata(path)
    scores = {int(name.split(".")[1]): tensor for name, tensor in load_tensors(path).items()}
    return {"scores": dict(sorted(scores.items())), **{key: json.loads(value) for key, value in metadata.items()}}


def cg_entries(att: Attributor, dense: Dense | None, solve_tokens: int, checkpoints: tuple[int, ...],
               fisher: str = "empirical") -> tuple[list, np.ndarray | None, dict]:
    """(row metadata, scores) per CG checkpoint of attrib's own solve (`cg_solve`) at the default damping,
    the dense exact reference with the same system and λ_l (whole corpus; None without `dense`), and the
    solve's cost and residuals. Each row is compared with EK-FAC of the same factors (its x₀)."""
    solve = cg_solve(att, solve_tokens, checkpoints, fisher)
    tokens, system = solve["cost"]["solve_tokens"], solve["cost"]["system"]
    entries, first = [], None
    for k, scores in sorted(solve["scores"].items()):
        label = f"EK-FAC ({fisher})" if k == 0 else f"EK-FAC ({fisher}) + CG on {system}, {k} iteration{'s' if k > 1 else ''}"
        first = first or label
        entries.append(({"setting": f"{label}, solve sample {tokens} tokens", "strategy": "cg", "iterations": k,
                         "solve_tokens": tokens, "fisher": fisher, "system": system,
                         "damping_scale": DEFAULT_DAMPING_SCALE, "damping": None,
                         "relative_residual": solve["residuals"][k], "versus": f"{first}, solve sample {tokens} tokens"},
                        scores.numpy()))
    reference = None
    if dense is not None:
        reference = dense.influence(dense.gauss_newton if system == "gauss-newton" else dense.empirical, solve["dampings"])
    return entries, reference, {**solve["cost"], "fisher": fisher, "mean_relative_residual": solve["residuals"]}


def dense_cg_entries(att: Attributor, dense: Dense, checkpoints: tuple[int, ...],
                     damping_scale: float = DEFAULT_DAMPING_SCALE) -> list:
    """(row metadata, scores) of PCG on the dense whole-corpus systems, for each fitted Fisher (the
    preconditioner, x₀ and λ_l = c × mean(Λ_l)) and each system (the K-label Gauss-Newton estimate and
    the empirical Fisher), iterates k of `checkpoints` from attrib.solve.preconditioned_cg, and each
    system's exact damped inverse: which curvature CG should solve, and whether solving it hurts."""
    from attrib.curvature import load_curvature

    b = [dense.V[:, s].reshape(-1, layer.d_out, layer.d_in_folded) for s, layer in zip(dense.slices, att.layers)]
    split = lambda X: [X[:, s].reshape(-1, l.d_out, l.d_in_folded) for s, l in zip(dense.slices, att.layers)]  # noqa: E731
    entries = []
    for fisher in ("empirical", "true"):
        curvature = load_curvature(str(att.fit("ekfac", fisher)), att.layers, None, damping_scale=damping_scale)
        dampings = [curvature.damping_of(i) for i in range(len(att.layers))]
        precondition = lambda xs, curvature=curvature: [curvature[i].inverse_times(x) for i, x in enumerate(xs)]  # noqa: E731
        baseline = f"EK-FAC ({fisher}), c={damping_scale:g}"
        entries.append(({"setting": baseline, "strategy": "ekfac", "fisher": fisher, "damping_scale": damping_scale,
                         "damping": None, "versus": baseline}, (_flat(precondition(b)) @ dense.D.T).numpy()))
        for system, F in (("gauss-newton", dense.gauss_newton), ("empirical-fisher", dense.empirical)):
            A = F.clone()
            for s, damping in zip(dense.slices, dampings):
                torch.diagonal(A)[s] += damping
            iterates, residuals = cg_iterates(lambda xs, A=A: split(_flat(xs) @ A), precondition, b, checkpoints)
            meta = {"strategy": "cg-dense", "fisher": fisher, "system": system, "damping_scale": damping_scale,
                    "damping": None, "versus": baseline, "reference": (fisher, system)}
            entries.append(({**meta, "setting": f"  exact dense {system} inverse, same λ_l", "strategy": "exact"},
                            dense.influence(F, dampings)))
            for k in checkpoints:
                if k:
                    entries.append(({**meta, "setting": f"  + CG on dense {system}, {k} iteration{'s' if k > 1 else ''}",
                                     "iterations": k, "relative_residual": float(residuals[k].mean())},
                                    (_flat(iterates[k]) @ dense.D.T).numpy()))
    return entries


def evaluate(att: Attributor, setup, work: Path, kinds: list[str], num_models: int, jobs: int,
             grid=DEFAULTS_GRID, exact_samples: int = 0, cg_tokens: tuple[int, ...] = (),
             cg_checkpoints: tuple[int, ...] = (0, 1, 3, 10, 30), cg_fishers: tuple[str, ...] = ("empirical",),
             cg_dense: bool = False) -> dict:
    """LDS of every row of `grid` with bootstrap intervals, per query kind, and against the first row;
    with exact_samples > 0 also the dense exact references' LDS (the ceiling of any better solve at this
    size) and each row's agreement with the reference of its Fisher and damping scale. CG rows (attrib's
    solve for each of `cg_tokens` × `cg_fishers`; with `cg_dense` PCG on the dense systems) are compared
    with EK-FAC of the same factors at the same damping (paired interval)."""
    started = time.perf_counter()
    subsets = lds.subset_models(att, setup, work, num_models, jobs)
    train_seconds = time.perf_counter() - started
    masks = np.array([np.isin(att.doc_ids, s["docs"]) for s in subsets], dtype=float)
    actual = np.array([s["log_probs"] for s in subsets])
    t0 = time.perf_counter()
    all_scores = att.scores_many([(att.fit(strategy, fisher), scale, damping)
                                  for _, strategy, fisher, scale, damping in grid], rank=lds.DEFAULT_RANK) if grid else []
    score_seconds = time.perf_counter() - t0
    entries = [({"setting": label, "strategy": strategy, "fisher": fisher, "damping_scale": scale, "damping": damping},
                scores) for (label, strategy, fisher, scale, damping), scores in zip(grid, all_scores)]
    exact_seconds, references, cg_costs, dense = None, {}, [], None
    if exact_samples:
        t0 = time.perf_counter()
        dense = Dense.of(att, exact_samples)
        references = dense_references(dense, exact_samples) if grid else {}
        exact_seconds = round(time.perf_counter() - t0, 1)
        for (fisher, c), scores in references.items():
            name = f"GN, K={exact_samples} labels" if fisher == "true" else "empirical Fisher"
            entries.append(({"setting": f"exact dense {name}, c={c:g}", "strategy": "exact", "fisher": fisher,
                             "damping_scale": c, "damping": None}, scores))
        if cg_dense:
            for meta, scores in dense_cg_entries(att, dense, cg_checkpoints):
                if meta["strategy"] == "exact":
                    references[meta["reference"]] = scores
                entries.append((meta, scores))
    for tokens in cg_tokens:
        for fisher in cg_fishers:
            cg, reference, cost = cg_entries(att, dense, tokens, cg_checkpoints, fisher)
            if reference is not None:
                references[("cg", fisher, tokens)] = reference
                cg = [({**meta, "reference": ("cg", fisher, tokens)}, scores) for meta, scores in cg]
            entries += cg
            cg_costs.append(cost)
            log(f"  CG solve ({fisher} factors) on {tokens} tokens: {cost}")
    rows, per_setting = [], {}
    for meta, scores in entries:
        row = {**meta, **lds.lds(scores, masks, actual, kinds)}
        per_query = np.array(row["per_query"])
        per_setting[meta["setting"]] = per_query
        row["ci"] = bootstrap(per_query)
        for kind in sorted(set(kinds)):
            row[f"{kind}_ci"] = bootstrap(per_query[[k == kind for k in kinds]])
        baseline = per_setting[meta.get("versus", entries[0][0]["setting"])]
        row["delta"] = float((per_query - baseline).mean())
        row["delta_ci"] = bootstrap(per_query - baseline)
        reference = meta.pop("reference", (meta["fisher"], meta["damping_scale"] if meta["strategy"] != "identity" else 0.1))
        row.pop("reference", None)
        if meta["strategy"] != "exact" and meta["damping"] is None and reference in references:
            agreement = correlations(scores, references[reference])
            row["agreement"] = {k: agreement[k] for k in ("pearson", "spearman", "pearson_min")}
        rows.append(row)
        log(f"  {meta['setting']}: LDS {row['lds']:.3f} [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}], "
            f"Δ {row['delta']:+.3f} [{row['delta_ci'][0]:+.3f}, {row['delta_ci'][1]:+.3f}]"
            + (f", Pearson vs exact {row['agreement']['pearson']:.3f}" if "agreement" in row else ""))
    return {"setup": setup.__dict__, "shapes": att.shapes(), "num_models": num_models,
            "subset_training_seconds": round(train_seconds, 1), "fit_and_score_seconds": round(score_seconds, 1),
            "exact_seconds": exact_seconds, "cg_costs": cg_costs, "rows": rows,
            "actual_log_prob_std_over_models": float(actual.std(0).mean()),
            "seconds": round(time.perf_counter() - started, 1)}


def cached_synthetic_rows(path: Path) -> list[list]:
    """The defaults grid's rows that lds.py already measured (c = 0.1, 0.01, 0.001 with the true Fisher,
    the empirical Fisher at c = 0.1), from its results JSON, with the same bootstrap intervals."""
    wanted = {("method", "ekfac"): "c=0.1, true (default)", ("damping", "0.01"): "c=0.01, true",
              ("damping", "0.001"): "c=0.001, true", ("fisher", "empirical"): "c=0.1, empirical"}
    table = []
    for result in json.loads(Path(path).read_text())["results"]:
        kit = f"{result['shapes']['model_type']}, {result['corpus']}"
        kinds = ["fact"] * (result["shapes"]["queries"] - result["setup"]["generic"]) + ["generic"] * result["setup"]["generic"]
        rows = {wanted[(r["group"], r["method"])]: np.array(r["per_query"]) for r in result["rows"]
                if (r["group"], r["method"]) in wanted}
        baseline = rows["c=0.1, true (default)"]
        for label in wanted.values():
            per_query = rows[label]
            ci, delta = bootstrap(per_query), bootstrap(per_query - baseline)
            per_kind = " / ".join(f"{per_query[[k == kind for k in kinds]].mean():.3f}" for kind in ("fact", "generic"))
            table.append([kit, label, f"{per_query.mean():.3f} [{ci[0]:.3f}, {ci[1]:.3f}]", per_kind,
                          f"{(per_query - baseline).mean():+.3f} [{delta[0]:+.3f}, {delta[1]:+.3f}]"])
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kit", default="fortunes", help=f"fortunes, or a synthetic kit: {', '.join(SYNTHETIC_KITS)}")
    parser.add_argument("--arch", default="llama")
    parser.add_argument("--fortunes", default=None, help="the fortune files (pkg/usr/share/games/fortunes)")
    parser.add_argument("--docs", type=int, default=RealSetup.docs)
    parser.add_argument("--queries", type=int, default=RealSetup.queries)
    parser.add_argument("--hidden", type=int, default=RealSetup.hidden)
    parser.add_argument("--steps", type=int, default=RealSetup.steps)
    parser.add_argument("--models", type=int, default=50, help="M, the number of subset models")
    parser.add_argument("--jobs", type=int, default=1, help="subset models trained at once (one thread each)")
    parser.add_argument("--exact", type=int, default=0, metavar="K",
                        help="also the dense exact references (GN with K sampled labels per token, and the empirical "
                             "Fisher) and each row's agreement with them; for models of a few thousand tracked parameters")
    parser.add_argument("--work", default=str(default_work()),
                        help="cache of models, subset models and factors (default $ATTRIB_CACHE_DIR/eval)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--cg-tokens", default="", help="EK-FAC + CG rows (attrib's solve, default damping) for "
                        "these solve sample sizes (--solve-tokens), e.g. 2048,262144")
    parser.add_argument("--cg-fisher", default="empirical", help="the factors of those rows: empirical, true or both")
    parser.add_argument("--cg-dense", action="store_true", help="with --exact: CG on the dense whole-corpus GN and "
                        "empirical-Fisher systems from either factors, and their exact inverses (default damping)")
    parser.add_argument("--cg-iterations", default="0,1,3,10,30", help="CG iteration counts read from one run")
    parser.add_argument("--only-cg", action="store_true", help="with --cg-tokens: only the CG rows and their "
                        "reference (EK-FAC is CG's x₀), not the defaults grid")
    parser.add_argument("--cached", default=None, metavar="LDS_JSON",
                        help="only print the grid's rows already in lds.py's results (e.g. scripts/eval/results/lds.json)")
    args = parser.parse_args(argv)
    if args.cached:
        print(markdown_table(["model, corpus", "setting", "LDS [95% CI]", "fact / generic", "Δ vs default [95% CI]"],
                             cached_synthetic_rows(Path(args.cached))))
        return 0
    work = Path(args.work)
    if args.kit == "fortunes" and not args.fortunes:
        parser.error("--kit fortunes needs --fortunes DIR (see the docstring for how to fetch it)")
    setup, att, kinds = open_kit(args.kit, args.arch, work, args.fortunes, docs=args.docs, queries=args.queries,
                                 hidden=args.hidden, steps=args.steps)
    log(f"LDS ({args.kit}): {setup.name()}, M={args.models}, {att.shapes()}")
    result = {"kit": args.kit, **evaluate(att, setup, work, kinds, args.models, args.jobs, exact_samples=args.exact,
                                          grid=[] if args.only_cg else DEFAULTS_GRID,
                                          cg_tokens=tuple(int(t) for t in args.cg_tokens.split(",") if t),
                                          cg_checkpoints=tuple(int(k) for k in args.cg_iterations.split(",")),
                                          cg_fishers=tuple(args.cg_fisher.split(",")), cg_dense=args.cg_dense)}
    table = []
    for row in result["rows"]:
        per_kind = " / ".join(f"{row[k]:.3f} [{row[k + '_ci'][0]:.2f}, {row[k + '_ci'][1]:.2f}]"
                              for k in sorted(set(kinds)))
        table.append([row["setting"], f"{row['lds']:.3f} [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}]", per_kind,
                      f"{row['delta']:+.3f} [{row['delta_ci'][0]:+.3f}, {row['delta_ci'][1]:+.3f}]",
                      row["agreement"]["pearson"] if "agreement" in row else "—"])
    print(markdown_table(["setting", "LDS [95% CI]", " / ".join(sorted(set(kinds))), "Δ vs EK-FAC / first row [95% CI]",
                          "Pearson vs exact (same Fisher and c)"], table))
    print(f"\n{result['shapes']}, subset training {result['subset_training_seconds']} s, total {result['seconds']} s")
    write_json(args.out, {"evaluation": "lds-defaults", **result})
    return 0


if __name__ == "__main__":
    from attrib.runtime import session

    with session(quiet=True):  # attrib's own progress lines would bury the script's
        raise SystemExit(main())
