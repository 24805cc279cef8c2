"""Regenerate ``jobs/data/prompts.parquet``, the small demo prompt file the project ships.

Usage (from the repo root)::

    python jobs/data/make_prompts.py [--out jobs/data/prompts.parquet]

48 rows, columns ``id`` (``demo-000`` ...), ``prompt`` and ``style``. ``style`` is an
extra column that the jobs carry through to their output untouched. The file is written
with ``row_group_size=16`` (3 row groups) and no wall-clock metadata, so reruns are
byte-identical for a given pyarrow version.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# (style, prompt), grouped by style for editing; written interleaved (see ordered_prompts).
# Kept short (< 20 words), varied subjects, no real people.
PROMPTS: list[tuple[str, str]] = [
    ("photo", "a red fox sitting in fresh snow, golden hour, 35mm photo"),
    ("photo", "a steaming cup of coffee on a wooden table by a rainy window"),
    ("photo", "aerial view of a winding river through an autumn forest"),
    ("photo", "a golden retriever puppy running on a beach at sunset"),
    ("photo", "a bowl of ramen with a soft-boiled egg, overhead shot, soft light"),
    ("photo", "a lighthouse on a rocky cliff during a storm, dramatic waves"),
    ("photo", "close-up of a dewdrop on a green leaf, macro photography"),
    ("photo", "a vintage red bicycle leaning against a blue door in Lisbon"),
    ("photo", "a snowy mountain lake at dawn, mirror-like reflection, wide angle"),
    ("photo", "a busy night market street with neon signs, shallow depth of field"),
    ("photo", "portrait of an old fisherman with a weathered face, natural light"),
    ("photo", "a hummingbird hovering next to a pink flower, high shutter speed"),
    ("photo", "fresh sourdough bread on a linen cloth, rustic kitchen, morning light"),
    ("photo", "a desert highway stretching to the horizon under a starry sky"),
    ("photo", "a tabby cat sleeping in a sunbeam on a windowsill"),
    ("photo", "rows of lavender fields in Provence, warm summer evening"),
    ("painting", "an oil painting of a harbor with sailboats at sunrise, impressionist style"),
    ("painting", "a watercolor of a quiet village street after rain"),
    ("painting", "a still life of lemons and a copper jug, Dutch golden age painting"),
    ("painting", "an abstract painting with bold blue and orange brushstrokes"),
    ("painting", "a misty bamboo forest in traditional Chinese ink wash painting"),
    ("painting", "a field of sunflowers under a swirling sky, thick impasto brushwork"),
    ("painting", "a portrait of a woman in a blue headscarf, Renaissance oil painting"),
    ("painting", "a gouache painting of a cozy cabin in a snowy pine forest"),
    ("illustration", "a cute robot watering plants in a greenhouse, children's book illustration"),
    ("illustration", "a flat vector illustration of a city skyline at dusk"),
    ("illustration", "a dragon curled around a castle tower, fantasy book cover art"),
    ("illustration", "an isometric illustration of a tiny coffee shop, pastel colors"),
    ("illustration", "a fox and a rabbit having a picnic, storybook illustration"),
    ("illustration", "a detailed botanical illustration of a fern, vintage scientific plate"),
    ("illustration", "a retro travel poster of a mountain railway, bold flat colors"),
    ("illustration", "a whimsical treehouse village connected by rope bridges, concept art"),
    ("anime", "a girl with an umbrella at a rainy train station, anime style"),
    ("anime", "a spirit creature in a glowing forest at night, anime film still"),
    ("anime", "a seaside town in summer with cumulus clouds, anime background art"),
    ("3d-render", "a glossy ceramic teapot shaped like a whale, 3d render, studio lighting"),
    ("3d-render", "a low-poly island with palm trees floating in the sky, 3d render"),
    ("3d-render", "a futuristic sports car in a white studio, octane render"),
    ("3d-render", "a cozy isometric bedroom with plants and a desk, blender render"),
    ("digital-art", "a cyberpunk city street in the rain, neon reflections, digital art"),
    ("digital-art", "an astronaut floating above a purple nebula, highly detailed digital art"),
    ("digital-art", "a giant jellyfish drifting over a sunken city, surreal digital art"),
    ("digital-art", "a steampunk airship above the clouds at sunset, matte painting"),
    ("sketch", "a pencil sketch of an old oak tree in a meadow"),
    ("sketch", "a charcoal drawing of a horse galloping, loose expressive lines"),
    ("sketch", "an architectural ink sketch of a Gothic cathedral facade"),
    ("pixel-art", "a pixel art knight standing in front of a castle gate, 16-bit"),
    ("pixel-art", "a pixel art farm at sunset with a red barn and cows"),
]

ROW_GROUP_SIZE = 16


def ordered_prompts() -> list[tuple[str, str]]:
    """Round-robin over styles (first-seen order) so every row group mixes styles."""
    by_style: dict[str, list[str]] = {}
    for style, prompt in PROMPTS:
        by_style.setdefault(style, []).append(prompt)
    out: list[tuple[str, str]] = []
    while any(by_style.values()):
        for style, prompts in by_style.items():
            if prompts:
                out.append((style, prompts.pop(0)))
    return out


def build_table() -> pa.Table:
    rows = ordered_prompts()
    if len(rows) != 48:
        raise AssertionError(f"expected 48 prompts, got {len(rows)}")
    for _, p in rows:
        if len(p.split()) >= 20:
            raise AssertionError(f"prompt too long: {p!r}")
    schema = pa.schema(
        [("id", pa.string()), ("prompt", pa.string()), ("style", pa.string())]
    )
    return pa.table(
        {
            "id": [f"demo-{i:03d}" for i in range(len(rows))],
            "prompt": [p for _, p in rows],
            "style": [s for s, _ in rows],
        },
        schema=schema,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out",
        default=str(Path(__file__).with_name("prompts.parquet")),
        help="output path (default: next to this script)",
    )
    args = ap.parse_args(argv)
    table = build_table()
    pq.write_table(
        table,
        args.out,
        row_group_size=ROW_GROUP_SIZE,
        store_schema=False,  # no ARROW:schema blob; plain strings need none
    )
    md = pq.ParquetFile(args.out).metadata
    print(f"wrote {args.out}: {md.num_rows} rows, {md.num_row_groups} row groups")


if __name__ == "__main__":
    main()
