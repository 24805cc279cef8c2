"""The tiny models' building blocks: tokenizer, text encoders, VAEs, UNets, ControlNet, scheduler, and the
folders of a rectified-flow model (see jobs/tiny/__init__.py)."""


import collections
import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Words the tiny tokenizer learns merges from, so ordinary prompts take a handful of tokens per word.
_TOKENIZER_CORPUS = """
a an the of in on at with and or by from to for under over near into above below behind beside
photo photograph painting illustration drawing render portrait landscape close up macro wide angle shot
red orange yellow green blue purple pink white black grey gray golden silver brown dark bright soft warm cold
cat dog fox owl bird horse lion tiger bear wolf deer rabbit fish whale dragon robot astronaut knight wizard
woman man girl boy child person people family friends crowd city street house castle tower bridge road
mountain mountains river lake sea ocean beach forest tree trees flower flowers garden field desert snow rain
sky sun moon stars night day morning evening sunset sunrise cloud clouds storm fog mist light shadow
sitting standing running flying walking sleeping reading playing dancing swimming floating glowing
old new small big tiny huge beautiful cozy quiet busy ancient futuristic modern vintage rustic magical
oil watercolor pencil digital art style cinematic lighting detailed highly realistic photorealistic
8k 4k 35mm lens bokeh studio hdr trending artstation concept octane unreal engine vibrant colors pastel
cup coffee tea book table chair window room kitchen library market cafe train car boat ship plane
"""
_NUM_MERGES = 400
_VOCAB_SPECIAL = ("<|startoftext|>", "<|endoftext|>")

HIDDEN_SIZE = 32
SAMPLE_SIZE = 8  # latent side: tiny models default to 64x64 images


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters, the alphabet of byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _train_bpe(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Learns BPE merges the way CLIP's vocabulary was made: within words, the last symbol carrying `</w>`."""
    byte_encoder = bytes_to_unicode()
    words = collections.Counter(corpus.split())
    splits = {}
    for word in words:
        symbols = [byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        splits[word] = symbols
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, symbols in splits.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[word]
        if not pairs:
            break
        # Ties broken by the pair itself so the merges never depend on dict order.
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        for word, symbols in splits.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            splits[word] = merged
    return merges


def tokenizer_vocab_and_merges(corpus: str = _TOKENIZER_CORPUS,
                               num_merges: int = _NUM_MERGES) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP vocabulary: every byte, every byte ending a word, the learned merges, the special tokens."""
    merges = _train_bpe(corpus, num_merges)
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(pair) for pair in merges]
    tokens += list(_VOCAB_SPECIAL)
    vocab = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def build_tokenizer(corpus: str = _TOKENIZER_CORPUS, num_merges: int = _NUM_MERGES) -> CLIPTokenizer:
    """A working CLIP BPE tokenizer (transformers 5 takes `vocab=` and `merges=`, and ignores `vocab_file=`)."""
    vocab, merges = tokenizer_vocab_and_merges(corpus, num_merges)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def write_slow_tokenizer_files(folder: Path, corpus: str = _TOKENIZER_CORPUS, num_merges: int = _NUM_MERGES) -> None:
    """vocab.json and merges.txt beside tokenizer.json, as the SD-1.5 repos ship them for slow tokenizers."""
    vocab, merges = tokenizer_vocab_and_merges(corpus, num_merges)
    (folder / "vocab.json").write_text(json.dumps(vocab) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(1)
    return CLIPTextModel(config).eval()


def build_vae() -> AutoencoderKL:
    """Four blocks, so images are 8x the latent side, as in SD-1.5."""
    torch.manual_seed(2)
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=SAMPLE_SIZE * 8,
    ).eval()


def build_tiny_decoder() -> AutoencoderTiny:
    """A tiny AutoencoderTiny (TAESD's architecture, few channels), for --decoder tiny."""
    torch.manual_seed(6)
    return AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).eval()


def build_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN_SIZE,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()
    # Random init leaves the output conv near zero; doubling it makes samples move visibly while keeping the
    # teacher's 25-step latents in a range where fp32 batch-invariance holds to 1e-4.
    with torch.no_grad():
        unet.conv_out.weight.mul_(2.0)
    return unet


def build_controlnet(unet: UNet2DConditionModel):
    """A ControlNet made from the UNet's layout, as diffusers' ControlNetModel.from_unet does. Its zero
    convolutions (the residual outputs and the conditioning embedding's last layer) start at zero in training;
    here they are seeded, and the embedding's other layers amplified, so that the control image changes the
    samples visibly."""
    from diffusers import ControlNetModel

    torch.manual_seed(8)  # the conditioning embedding's initialisation
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16)).eval()
    generator = torch.Generator().manual_seed(7)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]
    embedding = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(0.3 * torch.randn(conv.weight.shape, generator=generator))
            conv.bias.copy_(0.05 * torch.randn(conv.bias.shape, generator=generator))
        for conv in (embedding.conv_in, *embedding.blocks):  # at random init the image's signal dies out in them
            conv.weight.mul_(3.0)
    return controlnet


WIDE_HIDDEN_SIZE = 48  # the wide model's text width, and so its UNet's cross-attention size


def build_wide_text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=WIDE_HIDDEN_SIZE, intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=6, max_position_embeddings=77,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    torch.manual_seed(10)
    return CLIPTextModel(config).eval()


def build_wide_unet() -> UNet2DConditionModel:
    """Three levels instead of two, two layers per block, other widths and heads, a 48-wide cross-attention."""
    torch.manual_seed(11)
    unet = UNet2DConditionModel(
        block_out_channels=(24, 48, 48),
        layers_per_block=2,
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=WIDE_HIDDEN_SIZE,
        attention_head_dim=(3, 6, 6),
        norm_num_groups=4,
    ).eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(2.0)
    return unet


def build_scheduler() -> PNDMScheduler:
    """The scheduler config SD-1.5 ships; teachers build DPM-Solver from it, as users of diffusers do."""
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )


def write_rectified_flow_model(out: Path, teacher_dir: Path, unet: UNet2DConditionModel) -> None:
    """Same layout as XCLiu's hub repos: SD-1.5's shared components plus a new UNet, a custom pipeline class."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(teacher_dir / name, out / name)
    unet.save_pretrained(out / "unet")
    index = json.loads((teacher_dir / "model_index.json").read_text())
    index["_class_name"] = "RectifiedFlowPipeline"
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


