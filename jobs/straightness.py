"""Measure how straight a model's flow is on held-out pairs: the reflow loss, S(t) at t = 0.1, 0.3, 0.5, 0.7, 0.9
and their mean, and the one-step error ||X0 + v(X0, 1000) − X1||².

`--model` takes a model (diffusers folder, hub id or fsspec URL) or a training output: then the model it started
from, every checkpoint (its EMA weights, the ones saved) and the final model are measured in step order, so reflow
is seen straightening the flow and distillation lowering the one-step error. Every model sees the same pairs and
the same flow times. Runs in one process, on a GPU when there is one.
"""

import copy
import json
import logging
import posixpath
from pathlib import Path

import numpy as np
import torch

from instaflow.loading import ComponentCache, Runtime, pipeline_geometry
from instaflow.models import MODEL_RECORD
from instaflow.text import encode_tokens, tokenize_prompts
from instaflow.training import STRAIGHTNESS_TIMES, flow_measures
from jobs.errors import entry_point, process_exit
from jobs.main import Parser
from jobs.options import json_object
from pipeline.manifest import read_manifest
from pipeline.model_source import resolve_model_source
from pipeline.training.pairs_data import PairSet, check_pairs_fit, find_pairs, read_shard
from pipeline.storage import filesystem, normalize_location, normalize_model, put_atomic, redact_text
from pipeline.training.worker import FINAL_DIR, list_checkpoints, read_ema_weights

logger = logging.getLogger(__name__)

COLUMNS = ("reflow_loss", "straightness", *(f"straightness_{t}" for t in STRAIGHTNESS_TIMES), "one_step_error")


def held_out(pairs: PairSet, max_pairs: int, seed: int) -> dict:
    """The first `max_pairs` ok pairs in shard order, with one flow time each drawn from `seed`."""
    fs, parts, taken = pairs.fs, [], 0
    for shard in pairs.shards:
        rows = read_shard(fs, shard)
        keep = min(len(rows.keys), max_pairs - taken)
        parts.append((rows.noise[:keep], rows.latent[:keep], rows.prompts[:keep]))
        taken += keep
        if taken == max_pairs:
            break
    return {
        "noise": torch.from_numpy(np.concatenate([p[0] for p in parts])),
        "latent": torch.from_numpy(np.concatenate([p[1] for p in parts])),
        "prompts": [prompt for p in parts for prompt in p[2]],
        "t": torch.from_numpy(np.random.default_rng(seed).random(taken)).float(),
    }


def measure(components, unet, pairs: dict, batch_size: int) -> dict:
    """Each measure's mean over the held-out pairs, for `unet` with the model's text encoder."""
    device = components.runtime.device
    sums = dict.fromkeys(COLUMNS, 0.0)
    for start in range(0, len(pairs["prompts"]), batch_size):
        part = slice(start, start + batch_size)
        embeds = encode_tokens(components.text_encoder, tokenize_prompts(components.tokenizer, pairs["prompts"][part]))
        measures = flow_measures(unet, pairs["noise"][part].to(device), pairs["latent"][part].to(device),
                                 embeds, pairs["t"][part].to(device))
        for name in COLUMNS:
            sums[name] += float(measures[name].sum())
    return {name: value / len(pairs["prompts"]) for name, value in sums.items()}


def models_to_measure(model: str, storage_options: dict) -> list[tuple[str, str, object]]:
    """(label, local model folder, a callable giving checkpoint weights or None) for a model or a training output."""
    fs, root = filesystem(normalize_location(model), storage_options)
    manifest = read_manifest(fs, root) if fs.isdir(root) else None
    if manifest is None or "init" not in manifest:
        return [(model, local_model(model, storage_options), None)]
    init = local_model(manifest["init"], storage_options)
    found = [("init", init, None)]
    for step, folder in list_checkpoints(fs, root):
        found.append((f"step {step}", init, lambda folder=folder: read_ema_weights(fs, folder)))
    if fs.exists(posixpath.join(root, FINAL_DIR, MODEL_RECORD)):
        found.append(("final", local_model(posixpath.join(model.rstrip("/"), FINAL_DIR), storage_options), None))
    return found


def local_model(model: str, storage_options: dict) -> str:
    """A local folder holding the model: a hub id or a URL is fetched (and pinned) as jobs fetch theirs."""
    return resolve_model_source(normalize_model(model), "float32", storage_options).local_dir(storage_options)


@entry_point
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = Parser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", required=True, help="held-out pairs: a pairs output root or its pairs/ folder")
    parser.add_argument("--model", required=True, action="append",
                        help="a model or a training output (all its checkpoints); may be given more than once")
    parser.add_argument("--max-pairs", type=int, default=256, help="the first N ok pairs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="draws the flow times of the reflow loss")
    parser.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto")
    parser.add_argument("--report", help="also write the rows as JSON lines to this URL")
    parser.add_argument("--storage-options", type=json_object, default={}, help="JSON passed to fsspec")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_pairs < 1 or args.batch_size < 1:
        parser.error("--max-pairs and --batch-size must be positive")
    use_gpu = args.device == "gpu" or (args.device == "auto" and torch.cuda.is_available())
    cache = ComponentCache(Runtime(torch.device("cuda" if use_gpu else "cpu"), torch.float32))
    found = find_pairs(args.pairs, args.storage_options)
    targets = []
    for model in args.model:
        measured = models_to_measure(model, args.storage_options)
        for folder in {folder for _, folder, _ in measured}:  # a training output's checkpoints share one
            flag = f"--model {redact_text(model)!r}"
            check_pairs_fit(found, pipeline_geometry(Path(folder), flag), flag)
        targets += measured
    pairs = held_out(found, args.max_pairs, args.seed)
    rows = []
    for label, model, weights in targets:
        components = cache.load(model)
        unet = components.unet
        if weights is not None:  # a copy: the cached UNet keeps the model's own weights for other labels
            unet = copy.deepcopy(unet)
            unet.load_state_dict(weights())
        rows.append({"model": label, **measure(components, unet, pairs, args.batch_size)})
    print(table(rows, len(pairs["prompts"])))
    if args.report:
        fs, path = filesystem(args.report, args.storage_options)
        put_atomic(fs, path, "".join(json.dumps(row) + "\n" for row in rows).encode())
    return 0


def table(rows: list[dict], num_pairs: int) -> str:
    names = ["reflow_loss", "straightness", *(f"S({t})" for t in STRAIGHTNESS_TIMES), "one_step_error"]
    width = max(len(row["model"]) for row in rows) + 2
    lines = [f"{num_pairs} held-out pairs", "model".ljust(width) + "".join(f"{n:>15}" for n in names)]
    for row in rows:
        lines.append(row["model"].ljust(width) + "".join(f"{row[c]:>15.5g}" for c in COLUMNS))
    return "\n".join(lines)


if __name__ == "__main__":
    process_exit(main())
