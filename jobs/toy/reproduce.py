"""Reflow, reproduced on a procedural toy set, offline: a text-conditioned flow trained from scratch (1-RF),
reflowed on its own pairs (2-RF) and distilled to one step, with the control that distils the 1-RF directly.

Every phase but the toy-specific ones (drawing the data, the autoencoder, the text encoder, the classifier) is one
of the engine's own jobs, run in this process on a local Ray (or `--ray-address`): `encode`, `train`,
`reflow-pairs`, `generate`, `straightness`. A phase that finished records itself in `OUT/phases/NAME.json` with
its seconds and results, so a re-run of a finished reproduction does nothing, and one killed mid-way skips what
finished and resumes the phase it was in (the engine's jobs resume their shards and checkpoints). The phases,
figures and what they say: jobs/toy/README.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from jobs.toy.data import (ATTRIBUTES, PARTIAL_CAPTIONS, Caption, draw, png_bytes, split_captions,
                           training_caption)
from jobs import encode, generate, reflow_pairs, straightness, train_reflow
from jobs.errors import EXIT_INTERRUPTED, entry_point, process_exit
from jobs.main import Parser
from jobs.options import json_object
from jobs.toy.evaluation import PARTIAL_TEXTS, caption_labels
from jobs.toy.report import write_report
from pipeline.manifest import MANIFEST_NAME
from pipeline.storage import filesystem, get_bytes, normalize_location, put_atomic
from pipeline.writers import with_image_column

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
HELD_OUT_FRACTION = 0.1
ROWS_PER_FILE = 1000
MODEL_INDEX = "model_index.json"  # at the top of a diffusers pipeline folder


@dataclass(frozen=True)
class Scale:
    images_per_caption: int  # training images drawn per training caption
    held_out_images_per_caption: int  # real images per held-out caption: the reference of every model's samples
    samples_per_held_out_caption: int  # generated samples per held-out caption, from every model
    samples_per_partial_caption: int  # generated samples, and real images, per partial caption (PARTIAL_CAPTIONS)
    noises_per_image: int  # the 1-RF's (noise, image) couplings: independent noises per training image
    pair_prompts_per_caption: int  # reflow and distillation pairs per training caption
    autoencoder_steps: int
    autoencoder_blocks: int  # latents 1/2^(blocks-1) of the image side: 4 as SD-1.5's (8x8), 3 for 16x16
    text_encoder_steps: int
    classifier_steps: int
    unet_widths: tuple[int, int]
    unet_top_attention: bool  # attention in the UNet's upper level too (see jobs.toy.models.build_unet)
    train_batch: int
    rf1_steps: int  # the 1-RF, from scratch
    reflow_steps: int  # the 2-RF, from the 1-RF
    distill_steps: int  # each one-step distillation (from the 2-RF, and the control from the 1-RF)
    euler_steps: int  # N: the teachers' Euler steps, and the N-step samples
    learning_rate: float  # the 1-RF's, from scratch
    finetune_learning_rate: float  # reflow and distillation, from a trained flow
    full_caption_share: float = 0.5  # training images shown with their full caption; the others with a partial one
    seed: int = 0


SCALES = {
    "smoke": Scale(images_per_caption=1, held_out_images_per_caption=1, samples_per_held_out_caption=1,
                   samples_per_partial_caption=2,
                   noises_per_image=1, pair_prompts_per_caption=1, autoencoder_steps=20, autoencoder_blocks=3,
                   text_encoder_steps=20, classifier_steps=20, unet_widths=(32, 64), unet_top_attention=False,
                   train_batch=32, rf1_steps=20, reflow_steps=10, distill_steps=10, euler_steps=4, learning_rate=1e-3,
                   finetune_learning_rate=1e-3),
    "full": Scale(images_per_caption=8, held_out_images_per_caption=4, samples_per_held_out_caption=4,
                  samples_per_partial_caption=32,
                  noises_per_image=4, pair_prompts_per_caption=6, autoencoder_steps=2400, autoencoder_blocks=3,
                  text_encoder_steps=400, classifier_steps=1200, unet_widths=(32, 64), unet_top_attention=False,
                  train_batch=64, rf1_steps=2000, reflow_steps=800, distill_steps=600, euler_steps=16,
                  learning_rate=5e-4, finetune_learning_rate=2e-4),
}
# Each model's samples on the evaluation captions, by the folder of the job that made them: a held-out pairs job
# writes the model's 1-step images (images/) beside its N-step pairs with their decoded latents (pairs/).
SAMPLE_FOLDERS = {"1rf_1step": "samples/1rf/images", "1rf_nstep": "samples/1rf/pairs",
                  "2rf_1step": "samples/2rf/images", "2rf_nstep": "samples/2rf/pairs",
                  "distilled_from_2rf": "samples/distilled-2rf", "distilled_from_1rf": "samples/distilled-1rf"}


class PhaseFailedError(RuntimeError):
    """A phase's job ended without success: its own error line said why, and a re-run resumes the phase."""


def check_status(what: str, status: int) -> None:
    """A phase's job's exit status, passed on: interrupted stays interrupted (130), any other failure is the
    phase's (1), never "a bug"."""
    if status == EXIT_INTERRUPTED:
        raise KeyboardInterrupt(f"{what} was interrupted")
    if status != 0:
        raise PhaseFailedError(f"{what} exited with status {status}; re-run reproduce-toy to resume")


def seeded_order(count: int, seed: int, stream: int) -> list[int]:
    """A seeded random order of `count` rows (one stream per list): rows written in combination order would put
    one shape in each shard, and the trainer shuffles only within a shard."""
    return np.random.default_rng([seed, stream]).permutation(count).tolist()


def code_digest() -> str:
    """The sha256 of every module of the engine and the toy (the packages instaflow, pipeline and jobs, as the
    driver imports them; newlines normalised), by relative path: what a reproduction's figures depend on besides
    its scale and the packages of `package_versions`."""
    import instaflow
    import jobs
    import pipeline

    digest = hashlib.sha256()
    for package in (instaflow, pipeline, jobs):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            if (path.parent / "__init__.py").exists():  # a module of the package, not a script beside it
                digest.update(f"{package.__name__}/{path.relative_to(root).as_posix()}\n".encode())
                digest.update(path.read_bytes().replace(b"\r\n", b"\n"))
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Python's version and those of the packages whose numerics the figures depend on."""
    import platform
    from importlib.metadata import version

    return {"python": platform.python_version(),
            **{name: version(name) for name in ("torch", "diffusers", "transformers", "numpy", "pillow")}}


class Reproduction:
    """One reproduction's folder, its phases and what they recorded."""

    def __init__(self, out: str, scale_name: str, storage_options: dict):
        self.out, self.scale_name, self.scale = normalize_location(out).rstrip("/"), scale_name, SCALES[scale_name]
        self.storage_options = storage_options
        self.fs, self.root = filesystem(self.out, storage_options)
        self.results: dict[str, dict] = {}

    def url(self, *parts: str) -> str:
        return posixpath.join(self.out, *parts)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    # --------------------------------------------------------------------------------------------------- phases

    def run(self) -> dict:
        self.check_not_an_output()
        self.check_scale()
        s = self.scale
        teacher_flags = ["--teacher-kind", "rf", "--steps", str(s.euler_steps), "--guidance-scale", "1"]
        student_flags = ["--student-steps", "1", "--student-guidance-scale", "1"]
        self.phase("data", self.write_data)
        self.phase("models", self.train_models)
        self.phase("classifier", self.train_classifier)
        self.phase("encode", lambda: self.job(encode.main, "--prompts", self.url("data", "train"), "--output",
                                              self.url("pairs", "encoded"), "--model", self.url("models", "init"),
                                              "--samples-per-prompt", str(s.noises_per_image)))
        self.phase("train_1rf", lambda: self.train("encoded", "models/init", "1rf", "reflow", s.rf1_steps))
        for model in ("1rf", "2rf"):
            teacher = self.url("train", model, "final")
            if model == "2rf":
                self.phase("train_2rf", lambda: self.train("1rf", "train/1rf/final", "2rf", "reflow", s.reflow_steps))
            self.phase(f"pairs_{model}", lambda: self.job(
                reflow_pairs.main, "--prompts", self.url("data", "pair-prompts"), "--output",
                self.url("pairs", model), "--teacher", teacher, *teacher_flags))
            # held-out pairs with the teacher's decoded N-step images, and the 1-step images of the same model
            self.phase(f"held_out_{model}", lambda: self.job(
                reflow_pairs.main, "--prompts", self.url("data", "eval-prompts"), "--output",
                self.url("samples", model), "--teacher", teacher, "--model", teacher, *teacher_flags, *student_flags,
                "--teacher-images",
                "--image-format", "png", "--format", "parquet"))
            self.phase(f"straightness_{model}", lambda: self.straightness(model))
        self.phase("distill_2rf", lambda: self.train("2rf", "train/2rf/final", "distilled-2rf", "distill-l2",
                                                     s.distill_steps))
        self.phase("distill_1rf", lambda: self.train("1rf", "train/1rf/final", "distilled-1rf", "distill-l2",
                                                     s.distill_steps))
        for source in ("2rf", "1rf"):
            self.phase(f"samples_distilled_{source}", lambda: self.job(
                generate.main, "--prompts", self.url("data", "eval-prompts"), "--output",
                self.url("samples", f"distilled-{source}"), "--model", self.url("train", f"distilled-{source}", "final"),
                "--steps", "1", "--guidance-scale", "1", "--image-format", "png", "--format", "parquet"))
        self.phase("measures", self.measure)
        self.phase("report", lambda: write_report(self.fs, self.root, self.report(), self.sample_grids()))
        return json.loads(get_bytes(self.fs, self.path("report.json")))

    def check_not_an_output(self) -> None:
        """Refuses a folder that is, or is inside, a job's output (its `_job.json` or shard markers) or a model
        folder (its `model_index.json`, or a lone model's `config.json` at the folder itself), up to the store's
        root: the reproduction's files would be mixed into theirs (verify then finds data files no marker claims;
        the model gets files of another)."""
        folder = self.root
        while True:
            held = [name for name in self.names_in(folder) if name == MANIFEST_NAME or name.endswith(".stats.json")
                    or name == MODEL_INDEX or (name == "config.json" and folder == self.root)]
            if held:
                what = "a model" if set(held) <= {MODEL_INDEX, "config.json"} else "a job's output"
                where = "this folder" if folder == self.root else f"it is inside {self.url_of(folder)}, which"
                raise ValueError(f"--out {self.out}: {where} holds {what} ({', '.join(held[:3])}), not a "
                                 "reproduction; use another --out")
            parent = posixpath.dirname(folder)
            if parent in ("", folder):
                return
            folder = parent

    def names_in(self, folder: str) -> list[str]:
        """The names at the top of a folder; none for a folder that is not there or that the store will not list
        (a bucket's top, to a key allowed only a prefix)."""
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return []

    def url_of(self, folder: str) -> str:
        """A folder at or above the reproduction's, spelt as --out is."""
        if self.out.endswith(self.root):
            return self.out[:len(self.out) - len(self.root) + len(folder)]
        return self.fs.unstrip_protocol(folder)

    def check_scale(self) -> None:
        """A folder keeps its scale and its code: another scale's phases, or phases of other code (any constant of
        the toy's models, data or evaluation, or of the engine's jobs) or other package versions, are other runs,
        not a resume."""
        path = self.path("reproduction.json")
        settings = {"scale": self.scale_name, **asdict(self.scale), "image_size": IMAGE_SIZE,
                    "held_out_fraction": HELD_OUT_FRACTION,
                    "partial_captions": [caption.text for caption in PARTIAL_CAPTIONS], "code": code_digest(),
                    "packages": package_versions()}
        settings = json.loads(json.dumps(settings))
        if self.fs.exists(path):
            found = json.loads(get_bytes(self.fs, path))
            if found != settings:
                differing = sorted(key for key in {*found, *settings} if found.get(key) != settings.get(key))
                raise ValueError(f"{self.url('reproduction.json')}: this folder holds a reproduction with other "
                                 f"settings (scale {found.get('scale')!r}; differing: {', '.join(differing)}); use "
                                 "another --out")
        else:
            put_atomic(self.fs, path, (json.dumps(settings, indent=1) + "\n").encode())

    def phase(self, name: str, work) -> dict:
        """Runs `work` unless the phase recorded itself as finished; records its seconds and results."""
        marker = self.path("phases", f"{name}.json")
        if self.fs.exists(marker):
            self.results[name] = json.loads(get_bytes(self.fs, marker))
            logger.info("phase %s: finished before (%.0f s), skipped", name, self.results[name]["seconds"])
            return self.results[name]
        logger.info("phase %s: starting", name)
        started = time.perf_counter()
        results = work() or {}
        record = {"seconds": round(time.perf_counter() - started, 2), **results}
        put_atomic(self.fs, marker, (json.dumps(record, indent=1) + "\n").encode())
        self.results[name] = record
        logger.info("phase %s: finished in %.0f s", name, record["seconds"])
        return record

    def job(self, main, *argv: str) -> None:
        """One of the engine's jobs, as its command line runs it; anything but success stops the reproduction."""
        common = ["--height", str(IMAGE_SIZE), "--width", str(IMAGE_SIZE), "--rows-per-shard", "500",
                  "--batch-size", "64", "--no-progress", *self.storage_flag()]
        check_status(main.__module__, main([*argv, *common]))

    def storage_flag(self) -> list[str]:
        return ["--storage-options", json.dumps(self.storage_options)] if self.storage_options else []

    def train(self, pairs: str, init: str, output: str, loss: str, steps: int) -> dict:
        s = self.scale
        learning_rate = s.learning_rate if output == "1rf" else s.finetune_learning_rate
        status = train_reflow.main([
            "--pairs", self.url("pairs", pairs), "--init", self.url(*init.split("/")), "--output",
            self.url("train", output), "--loss", loss, "--steps", str(steps), "--batch-size", str(s.train_batch),
            "--learning-rate", str(learning_rate), "--warmup-steps", str(max(1, steps // 20)),
            "--ema-decay", "0.999", "--cpus-per-worker", str(os.cpu_count() or 1), "--checkpoint-every", str(max(10, steps // 4)), "--log-every",
            str(max(5, steps // 20)), "--loader-workers", "0", "--cache-text-embeddings", "--seed", str(s.seed),
            *self.storage_flag()])
        check_status(f"training {output}", status)
        metrics = [json.loads(line) for line in get_bytes(self.fs, self.path("train", output, "metrics.jsonl"))
                   .decode().splitlines()]
        return {"loss": loss, "steps": steps, "batch_size": s.train_batch, "learning_rate": learning_rate,
                "pairs": pairs, "init": init,
                "final_loss": metrics[-1]["loss"], "loss_curve": [[m["step"], m["loss"]] for m in metrics]}

    def straightness(self, model: str) -> dict:
        report = self.url("measures", f"straightness-{model}.jsonl")
        status = straightness.main(["--pairs", self.url("samples", model, "pairs"), "--model",
                                    self.url("train", model, "final"), "--max-pairs", "1024", "--batch-size", "64",
                                    "--report", report, *self.storage_flag()])
        check_status(f"straightness of {model}", status)
        row = json.loads(get_bytes(self.fs, self.path("measures", f"straightness-{model}.jsonl")).splitlines()[-1])
        return {"mean": row["straightness"], "curve": {k.split("_")[1]: v for k, v in row.items()
                                                       if k.startswith("straightness_")},
                "reflow_loss": row["reflow_loss"], "one_step_error": row["one_step_error"]}

    # ---------------------------------------------------------------------------------------- toy-specific work

    def write_data(self) -> dict:
        """The image sets in the engine's image-dataset format: training (each image with its full caption or a
        partial one), and the evaluation's real images (of the held-out captions, and of each partial caption from
        the training combinations that fit it) with a second draw of them; the prompt files of the pairs and of
        the evaluation samples."""
        s = self.scale
        training, held_out = split_captions(HELD_OUT_FRACTION, s.seed)
        rng = np.random.default_rng(s.seed)
        drawn = [c for c in training for _ in range(s.images_per_caption)]
        shown = [training_caption(c, s.full_caption_share, rng) for c in drawn]
        order = seeded_order(len(drawn), s.seed, 1)
        self.write_images("train", [drawn[i] for i in order], [shown[i] for i in order], seeds=order)
        self.write_real("eval-real", training, held_out, s.held_out_images_per_caption, rng, first_seed=10**8)
        # a second, independent draw of the same captions, as many as a model's samples: measured as a model's are,
        # it shows what a perfect model scores
        self.write_real("eval-real-again", training, held_out, s.samples_per_held_out_caption,
                        np.random.default_rng([s.seed, 3]), first_seed=2 * 10**8)
        pairs = [training_caption(c, s.full_caption_share, rng) for c in training
                 for _ in range(s.pair_prompts_per_caption)]
        self.write_prompts("pair-prompts", [pairs[i].text for i in seeded_order(len(pairs), s.seed, 2)])
        self.write_prompts("eval-prompts", [c.text for c in held_out for _ in range(s.samples_per_held_out_caption)]
                           + [c.text for c in PARTIAL_CAPTIONS for _ in range(s.samples_per_partial_caption)])
        return {"training_captions": len(training), "held_out_captions": len(held_out),
                "training_images_with_full_captions": sum(c == d for c, d in zip(shown, drawn)),
                "training_images": len(drawn), "held_out_examples": [c.text for c in held_out[:5]],
                "partial_captions": [c.text for c in PARTIAL_CAPTIONS]}

    def write_real(self, name: str, training: list[Caption], held_out: list[Caption], per_held_out: int,
                   rng: np.random.Generator, first_seed: int) -> None:
        """Real images of the evaluation's captions: `per_held_out` of each held-out caption, and of each partial
        caption as many as its samples, drawn from the training combinations that fit it."""
        s = self.scale
        real = [(c, c) for c in held_out for _ in range(per_held_out)]
        for partial in PARTIAL_CAPTIONS:
            fits = [c for c in training if partial.matches(c)]
            real += [(fits[k], partial) for k in rng.integers(len(fits), size=s.samples_per_partial_caption)]
        self.write_images(name, [image for image, _ in real], [caption for _, caption in real],
                          seeds=[first_seed + i for i in range(len(real))])

    def write_images(self, name: str, drawn: list[Caption], shown: list[Caption], seeds: list[int]) -> None:
        """Images of the `drawn` combinations (each image's jitter from its seed), each with its `shown` caption as
        the prompt and the drawn attributes in their own columns (the classifier's truth)."""
        for start in range(0, len(drawn), ROWS_PER_FILE):
            part = drawn[start : start + ROWS_PER_FILE]
            keys = [f"{name}-{start + i:06d}" for i in range(len(part))]
            images = {key: png_bytes(draw(caption, IMAGE_SIZE, seeds[start + i]))
                      for i, (key, caption) in enumerate(zip(keys, part))}
            table = pa.table({"id": keys, "key": keys, "status": ["ok"] * len(part),
                              "prompt": [caption.text for caption in shown[start : start + ROWS_PER_FILE]],
                              **{name_: [getattr(caption, name_) for caption in part] for name_ in ATTRIBUTES}})
            table = with_image_column(table, images, "png").drop_columns(["key", "status"])
            self.put_table(f"data/{name}/{start // ROWS_PER_FILE:05d}.parquet", table)

    def write_prompts(self, name: str, prompts: list[str]) -> None:
        ids = [f"{name}-{i:06d}" for i in range(len(prompts))]
        self.put_table(f"data/{name}/00000.parquet", pa.table({"id": ids, "prompt": prompts}))

    def put_table(self, relative: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        put_atomic(self.fs, self.path(*relative.split("/")), buffer.getvalue())

    def read_images(self, folder: str) -> tuple[np.ndarray, list[str], dict[str, np.ndarray] | None]:
        """The ok rows' images (uint8 NHWC), prompts and, for the real images, their drawn attributes' class
        indices (None for a model's samples), of every Parquet file in a folder, in file order."""
        images, prompts, drawn = [], [], []
        for path in sorted(self.fs.glob(self.path(folder, "*.parquet"))):
            table = pq.read_table(io.BytesIO(get_bytes(self.fs, path)))
            ok = table.column("status").to_pylist() if "status" in table.column_names else [None] * len(table)
            real = set(ATTRIBUTES) <= set(table.column_names)
            attributes = zip(*(table.column(name).to_pylist() for name in ATTRIBUTES)) if real else None
            for row, (value, prompt, status) in enumerate(zip(table.column("image").to_pylist(),
                                                              table.column("prompt").to_pylist(), ok)):
                values = next(attributes) if real else None
                if status in (None, "ok"):
                    images.append(np.asarray(Image.open(io.BytesIO(value["bytes"])).convert("RGB")))
                    prompts.append(prompt)
                    if real:
                        drawn.append([ATTRIBUTES[name].index(v) for name, v in zip(ATTRIBUTES, values)])
        if not images:
            raise PhaseFailedError(f"{self.url(folder)} has no image rows: remove its phase's marker in "
                                   f"{self.url('phases')} to make it again")
        truth = {name: np.array([d[i] for d in drawn]) for i, name in enumerate(ATTRIBUTES)} if drawn else None
        return np.stack(images), prompts, truth

    def train_models(self) -> dict:
        """The autoencoder and the text encoder, then the init folder the flow is trained from."""
        from jobs.toy.models import (build_unet, toy_tokenizer, train_autoencoder, train_text_encoder,
                                          write_init_model)

        s = self.scale
        images, prompts, drawn = self.read_images("data/train")
        vae = train_autoencoder(images, s.autoencoder_steps, 32, s.seed, log=logger.info, blocks=s.autoencoder_blocks)
        text_encoder = train_text_encoder(images, prompts, drawn, toy_tokenizer(), s.text_encoder_steps, 128, s.seed,
                                          log=logger.info)
        with tempfile.TemporaryDirectory(prefix="instaflow-toy-") as tmp:
            latent_side = IMAGE_SIZE // 2 ** (s.autoencoder_blocks - 1)
            unet = build_unet(latent_side, s.unet_widths, s.seed, s.unet_top_attention)
            write_init_model(Path(tmp), vae, text_encoder, unet)
            self.upload(Path(tmp), "models/init")
        return {"autoencoder_steps": s.autoencoder_steps, "text_encoder_steps": s.text_encoder_steps,
                "scaling_factor": vae.config.scaling_factor}

    def train_classifier(self) -> dict:
        """The judge, trained on the real training images and their drawn attributes before any flow (its features
        are the toy FID's); its accuracy on the real images of the held-out captions, and on the same images passed
        through the autoencoder (the best a model in its latent space can score)."""
        from jobs.toy.models import accuracy, to_unit_range, train_classifier
        from diffusers import AutoencoderKL

        s = self.scale
        images, _, drawn = self.read_images("data/train")
        classifier = train_classifier(images, drawn, s.classifier_steps, 128, s.seed, log=logger.info)
        buffer = io.BytesIO()
        torch.save(classifier.state_dict(), buffer)
        put_atomic(self.fs, self.path("models", "classifier.pt"), buffer.getvalue())
        real_images, real_prompts, _ = self.read_images("data/eval-real")
        held = held_out_rows(real_prompts)
        held_images, held_prompts = real_images[held], [real_prompts[i] for i in held]
        with tempfile.TemporaryDirectory(prefix="instaflow-toy-") as tmp:
            self.download("models/init/vae", Path(tmp))
            vae = AutoencoderKL.from_pretrained(tmp).eval()
        with torch.no_grad():
            decoded = torch.cat([vae.decode(vae.encode(to_unit_range(held_images[i : i + 128])).latent_dist.mean).sample
                                 for i in range(0, len(held_images), 128)])
        autoencoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        truth = caption_labels(held_prompts)
        return {"classifier_real": accuracy(classifier.predict(held_images), truth),
                "classifier_autoencoded": accuracy(classifier.predict(autoencoded), truth),
                "held_out_images": len(held_images)}

    def classifier(self):
        from jobs.toy.models import Classifier

        classifier = Classifier()
        classifier.load_state_dict(torch.load(io.BytesIO(get_bytes(self.fs, self.path("models", "classifier.pt"))),
                                              weights_only=True))
        return classifier.eval()

    def measure(self) -> dict:
        """Each model's per-attribute accuracy on the held-out captions, and every distribution measure with its
        interval (jobs/toy/evaluation.py)."""
        from jobs.toy.evaluation import Judged, evaluate
        from jobs.toy.models import accuracy

        classifier = self.classifier()
        judged = {name: Judged.of(classifier, *self.read_images(folder))
                  for name, folder in {"real": "data/eval-real", **SAMPLE_FOLDERS}.items()}
        again = self.read_images("data/eval-real-again")
        judged["real_again"] = Judged.of(classifier, *again[:2], None)  # judged as a model: by what its captions say
        measured = {}
        for name in SAMPLE_FOLDERS:
            held = held_out_rows(judged[name].prompts)
            measured[name] = accuracy({k: v[held] for k, v in judged[name].predicted.items()},
                                      {k: v[held] for k, v in judged[name].truth.items()}) | {"samples": len(held)}
        return {"accuracy": measured, **evaluate(judged, self.scale.seed)}

    def sample_grids(self) -> dict[str, list[tuple[Image.Image, str]]]:
        """Up to 16 samples of each model (and real images) of the held-out captions, and 16 of one partial
        caption: where the modes are, a one-step model that averages them shows a blur."""
        grids = {}
        shown_partial = PARTIAL_CAPTIONS[0].text
        for name, folder in {"real": "data/eval-real", **SAMPLE_FOLDERS}.items():
            images, prompts, _ = self.read_images(folder)
            held = held_out_rows(prompts)
            step = max(1, len(held) // 16)
            grids[name] = [(Image.fromarray(images[i]), prompts[i]) for i in held[::step]][:16]
            grids[f"partial-{name}"] = [(Image.fromarray(images[i]), prompts[i]) for i, prompt in enumerate(prompts)
                                        if prompt == shown_partial][:16]
        return grids

    # ---------------------------------------------------------------------------------------------- the report

    def report(self) -> dict:
        r, s = self.results, self.scale
        accuracy = {"classifier_real": r["classifier"]["classifier_real"]["shape_and_colour"],
                    "classifier_autoencoded": r["classifier"]["classifier_autoencoded"]["shape_and_colour"],
                    **{name: r["measures"]["accuracy"][name]["shape_and_colour"] for name in SAMPLE_FOLDERS}}
        detail = {"classifier_real": r["classifier"]["classifier_real"],
                  "classifier_autoencoded": r["classifier"]["classifier_autoencoded"],
                  **{name: r["measures"]["accuracy"][name] for name in SAMPLE_FOLDERS}}
        curves = {model: {k: v for k, v in r[f"straightness_{model}"].items() if k != "seconds"}
                  for model in ("1rf", "2rf")}
        phase_seconds = {name: record["seconds"] for name, record in r.items() if name != "report"}
        return {
            "scale": self.scale_name,
            "straightness": curves,
            "accuracy": accuracy,
            "accuracy_detail": detail,
            "measures": r["measures"]["measures"],
            "claims": {
                "reflow_straightened": {
                    "straightness": [curves["2rf"]["mean"], curves["1rf"]["mean"]],
                    "one_step_error": [curves["2rf"]["one_step_error"], curves["1rf"]["one_step_error"]],
                    "verdict": "shown" if curves["2rf"]["mean"] < curves["1rf"]["mean"]
                    and curves["2rf"]["one_step_error"] < curves["1rf"]["one_step_error"] else "not shown"},
                **r["measures"]["claims"],
            },
            "steps": {"euler_steps": s.euler_steps, "guidance_scale": 1.0, "autoencoder": s.autoencoder_steps,
                      "text_encoder": s.text_encoder_steps, "classifier": s.classifier_steps, "1rf": s.rf1_steps,
                      "2rf": s.reflow_steps, "distill_each": s.distill_steps},
            "budgets": {name: {k: r[name][k] for k in ("loss", "steps", "batch_size", "learning_rate", "pairs", "init",
                                                       "final_loss")}
                        for name in ("train_1rf", "train_2rf", "distill_2rf", "distill_1rf")},
            "loss_curves": {name: r[name]["loss_curve"] for name in ("train_1rf", "train_2rf", "distill_2rf",
                                                                      "distill_1rf")},
            "data": r["data"] | {"image_size": IMAGE_SIZE, "held_out_images": r["classifier"]["held_out_images"]},
            "settings": asdict(s),
            "seconds": {**phase_seconds, "total": round(sum(phase_seconds.values()), 2)},
        }

    # ---------------------------------------------------------------------------------------------- transfers

    def upload(self, local: Path, relative: str) -> None:
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            put_atomic(self.fs, self.path(*relative.split("/"), *file.relative_to(local).parts), file.read_bytes())

    def download(self, relative: str, local: Path) -> None:
        prefix = self.path(*relative.split("/"))
        for path in self.fs.find(prefix):
            target = local / posixpath.relpath(path, prefix)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(get_bytes(self.fs, path))




def held_out_rows(prompts) -> list[int]:
    """The rows of an evaluation set that are of held-out (full) captions, not of partial ones."""
    return [i for i, prompt in enumerate(prompts) if prompt not in PARTIAL_TEXTS]


@entry_point
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = Parser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the reproduction's folder (a path or any fsspec URL)")
    parser.add_argument("--scale", choices=tuple(SCALES), default="full",
                        help="smoke: the pipeline end to end in minutes; full: the figures of jobs/toy/README.md")
    parser.add_argument("--storage-options", type=json_object, default={}, help="JSON passed to fsspec")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = Reproduction(args.out, args.scale, args.storage_options).run()
    print(json.dumps({k: report[k] for k in ("straightness", "accuracy", "claims")}, indent=1))
    print(f"report: {posixpath.join(args.out, 'report.html')} ({report['seconds']['total']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    process_exit(main())
