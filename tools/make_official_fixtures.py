"""Write ``tests/fixtures/official/``: what the official mPLUG-Owl3 240728 code computes on a tiny checkpoint.

The official remote code is the oracle; it is not committed. To rerun (CPU is enough, about a minute):

    # a copy of the official 240728 remote code, e.g. the public one in github.com/AdaCheng/EgoThink:
    #   models/mPLUG-Owl3-7B-240728/{configuration_*,modeling_*,processing_mplugowl3,image_processing_mplugowl3,x_sdpa}.py
    python3 -m venv /work/official-venv
    /work/official-venv/bin/pip install torch==2.13.0 "transformers==4.44.2" "numpy<2" einops icecream pillow safetensors
    /work/official-venv/bin/pip install --no-deps "torchvision==0.28.*"
    /work/official-venv/bin/python tools/make_official_fixtures.py --official-code DIR

(Any torch that runs transformers 4.44 will do; a CPU-only torch with the PyPI torchvision wheel works
through ``tools/official_env.py``.) Nothing of hyperowl is imported here.

What it writes:

- ``checkpoint/``: a tiny random checkpoint saved by the official classes (``mPLUGOwl3Model.save_pretrained``,
  safetensors) with a small byte-level BPE tokenizer holding the official special tokens. Every weight is
  drawn at random (norm weights around 1) so that no term can hide.
- ``images/*.png``: the input images.
- ``cases.json``: per case the messages, media, cut flag, the official prompt (decoded ids), input ids,
  attention mask, media offsets, the SHA-256 of the float32 pixel tensor (and its shape and sum), and the
  16 greedy tokens of the official ``generate``.
- ``logits.safetensors``: the official logits ``[batch, seq, vocab]`` of every case (float32).

The official processor handles one conversation at a time; the left-padded batch is the two single
processor outputs, left-padded with ``<|endoftext|>``, media offsets shifted by the images of the earlier
sample and padded with [first, first] as for a sample's first tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_env import import_official

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "official"
#: "!" first, so that it gets id 0 as in the Qwen2 tokenizer of the releases (whose pad_token_id 0 the
#: official generate masks when no attention_mask is given).
SPECIAL = ["!", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image|>", "<|video|>"]
CORPUS = [
    "Describe the picture. What colour is the square? The square is red. A blue circle on a white background.",
    "Which picture shows a green triangle? Picture 3. What happens in the video? The red square appeared first.",
    "Cut to rows columns with a global view subimg global_view 0 1 2 3 4 5 6 7 8 9 yes no ! ?",
] * 20
IMAGE_SIZE = 32  # vision_config.image_size: the official processor is built with it (it hard-codes 384 for 7B)
GREEDY_TOKENS = 16

#: (name, width, height) of the input images: shapes that pick different cut grids.
IMAGES = [("wide", 90, 30), ("tall", 40, 70), ("square", 48, 48), ("flat", 120, 28)]
#: (name, width, height, frames) of the video.
VIDEO = ("video", 24, 20, 5)


def make_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>", additional_special_tokens=SPECIAL[2:]
    )
    tokenizer.save_pretrained(str(out))
    return tokenizer


def make_model(config_module, modeling_module, vocab_size: int, stops: list[int]):
    config = config_module.mPLUGOwl3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        hyper_layers=[2, 4],
        bos_token_id=stops[1],
        eos_token_id=stops[0],
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
            "model_type": "siglip_vision_model",
        },
        attn_implementation="sdpa",
        torch_dtype="float32",
    )
    config.architectures = ["mPLUGOwl3Model"]
    torch.manual_seed(0)
    model = modeling_module.mPLUGOwl3Model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model.float().eval()


def make_images(out: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    paths = {}
    for name, width, height in IMAGES:
        # smooth colour ramps plus noise, so that resizing matters
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
        array = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        paths[name] = out / f"{name}.png"
        Image.fromarray(array).save(paths[name])
    name, width, height, frames = VIDEO
    for i in range(frames):
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        paths[f"{name}{i}"] = out / f"{name}{i}.png"
        Image.fromarray(array).save(paths[f"{name}{i}"])
    return paths


#: (name, [conversation user texts], images per sample, cut, video frames per sample)
CASES = [
    ("text", ["What colour is the square?"], [[]], False, [[]]),
    ("one_image", ["<|image|>Describe the picture."], [["wide"]], False, [[]]),
    ("one_image_cut", ["<|image|>Describe the picture."], [["wide"]], True, [[]]),
    ("three_images", ["<|image|><|image|>Which picture shows a green triangle?<|image|>"], [["wide", "tall", "square"]], False, [[]]),
    ("one_image_cut_flat", ["What colour? <|image|>"], [["flat"]], True, [[]]),
    ("three_images_cut", ["<|image|><|image|><|image|>Which picture?"], [["wide", "tall", "square"]], True, [[]]),
    ("video", ["<|video|>What happens in the video?"], [[]], False, [[f"video{i}" for i in range(VIDEO[3])]]),
    ("padded_batch", ["<|image|>Describe the picture.", "What colour is the square? Which picture shows it?"], [["tall"], []], False, [[], []]),
    ("padded_batch_images", ["<|image|>Describe.", "Which picture shows a green triangle?<|image|>"], [["wide"], ["square"]], False, [[], []]),
]
#: A two-turn conversation with "!" (id 0) in it.
MULTI_TURN = [
    {"role": "user", "content": "<|image|>What colour is the square!"},
    {"role": "assistant", "content": "The square is red!"},
    {"role": "user", "content": "Describe the picture!"},
]


def run_official(processor, tokenizer, texts, images, cut, videos, paths):
    """The official processor on each conversation (a user text, or a list of messages), left-padded into one batch."""
    singles = []
    for text, names, frames in zip(texts, images, videos):
        turns = text if isinstance(text, list) else [{"role": "user", "content": text}]
        messages = [dict(m) for m in turns] + [{"role": "assistant", "content": ""}]
        kwargs = {"cut_enable": cut}
        if names:
            kwargs["images"] = [Image.open(paths[n]).convert("RGB") for n in names]
        if frames:
            kwargs["videos"] = [[Image.open(paths[n]).convert("RGB") for n in frames]]
        singles.append(processor(messages, **kwargs))
    length = max(s["input_ids"].shape[1] for s in singles)
    pad = tokenizer.pad_token_id
    ids, mask, offsets, pixels = [], [], [], []
    before = 0
    for s in singles:
        n = s["input_ids"].shape[1]
        ids.append(torch.cat([torch.full((length - n,), pad), s["input_ids"][0]]))
        mask.append(torch.cat([torch.zeros(length - n, dtype=torch.long), torch.ones(n, dtype=torch.long)]))
        offset = s["media_offset"][0]
        if "pixel_values" in s:
            offset = offset.clamp(min=0)  # a sample without images has -1000000 (there are none here)
        offset = offset + before
        offsets.append(torch.cat([offset[:1].expand(length - n, 2).clone() * 0 + before, offset]))
        if "pixel_values" in s:
            pixels.append(s["pixel_values"])
            before += s["pixel_values"].shape[0]
    return (
        torch.stack(ids),
        torch.stack(mask),
        torch.stack(offsets),
        torch.cat(pixels) if pixels else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-code", type=Path, required=True, help="directory of the official 240728 remote code")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    code = args.official_code.resolve()
    config_module = import_official(code, "configuration_mplugowl3")
    modeling_module = import_official(code, "modeling_mplugowl3")
    processing_module = import_official(code, "processing_mplugowl3")
    image_module = import_official(code, "image_processing_mplugowl3")

    out = args.out
    (out / "checkpoint").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out / "checkpoint")
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    model = make_model(config_module, modeling_module, len(tokenizer), stops)
    model.save_pretrained(str(out / "checkpoint"), safe_serialization=True)
    paths = make_images(out / "images")
    processor = processing_module.mPLUGOwl3Processor(
        image_processor=image_module.mPLUGOwl3ImageProcessor(image_size=IMAGE_SIZE), tokenizer=tokenizer
    )

    cases, logits = [], {}
    for name, texts, images, cut, videos in CASES:
        ids, mask, offsets, pixels = run_official(processor, tokenizer, texts, images, cut, videos, paths)
        with torch.inference_mode():
            output = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, media_offset=offsets)
            generated = model.generate(
                input_ids=ids, pixel_values=pixels, media_offset=offsets, attention_mask=mask, tokenizer=tokenizer,
                max_new_tokens=GREEDY_TOKENS, do_sample=False,
            )
        logits[name] = output.logits.float().contiguous()
        measured = {}
        if len(texts) > 1:
            # Each row alone: what a pad-aware model gives for the row in the batch.
            for row in range(len(texts)):
                one = run_official(processor, tokenizer, texts[row : row + 1], images[row : row + 1], cut, videos[row : row + 1], paths)
                with torch.inference_mode():
                    alone = model(pixel_values=one[3], input_ids=one[0], attention_mask=one[1], media_offset=one[2]).logits
                    alone_tokens = model.generate(
                        input_ids=one[0], pixel_values=one[3], media_offset=one[2], attention_mask=one[1], tokenizer=tokenizer,
                        max_new_tokens=GREEDY_TOKENS, do_sample=False,
                    )
                measured[f"row{row}_greedy_tokens_alone"] = alone_tokens[0].tolist()
                logits[f"{name}.row{row}_alone"] = alone.float().contiguous()
                n = alone.shape[1]
                measured[f"row{row}_batch_vs_alone_max_abs"] = float((output.logits[row, -n:] - alone[0]).abs().max())
        pixel_info = None
        if pixels is not None:
            data = pixels.float().contiguous().numpy().tobytes()
            pixel_info = {
                "shape": list(pixels.shape),
                "sha256": hashlib.sha256(data).hexdigest(),
                "sum": float(pixels.double().sum()),
            }
        cases.append(
            {
                "name": name,
                "user_texts": texts,
                "images": images,
                "videos": videos,
                "cut": cut,
                "prompts": [tokenizer.decode(row[m.bool()]) for row, m in zip(ids, mask)],
                "input_ids": ids.tolist(),
                "attention_mask": mask.tolist(),
                "media_offset": offsets.tolist(),
                "pixels": pixel_info,
                "greedy_tokens": generated.tolist(),
                "measured": measured,
            }
        )
        print(f"{name}: ids {tuple(ids.shape)}, pixels {None if pixels is None else tuple(pixels.shape)}, greedy {generated.tolist()}")
    # Called without attention_mask, the official generate builds one from input_ids != pad_token_id (0, "!").
    ids, mask, offsets, pixels = run_official(processor, tokenizer, [MULTI_TURN], [["square"]], False, [[]], paths)
    with torch.inference_mode():
        with_mask = model.generate(
            input_ids=ids, pixel_values=pixels, media_offset=offsets, attention_mask=mask, tokenizer=tokenizer,
            max_new_tokens=GREEDY_TOKENS, do_sample=False,
        )
        without_mask = model.generate(
            input_ids=ids, pixel_values=pixels, media_offset=offsets, tokenizer=tokenizer,
            max_new_tokens=GREEDY_TOKENS, do_sample=False,
        )
        logits["multi_turn"] = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, media_offset=offsets).logits.float().contiguous()
    zero_ids = int((ids == 0).sum())
    cases.append(
        {
            "name": "multi_turn",
            "user_texts": [MULTI_TURN],
            "images": [["square"]],
            "videos": [[]],
            "cut": False,
            "prompts": [tokenizer.decode(ids[0])],
            "input_ids": ids.tolist(),
            "attention_mask": mask.tolist(),
            "media_offset": offsets.tolist(),
            "pixels": {
                "shape": list(pixels.shape),
                "sha256": hashlib.sha256(pixels.float().contiguous().numpy().tobytes()).hexdigest(),
                "sum": float(pixels.double().sum()),
            },
            "greedy_tokens": with_mask.tolist(),
            "measured": {"id0_tokens_in_prompt": zero_ids, "greedy_tokens_without_attention_mask": without_mask.tolist()},
        }
    )
    print(f"multi_turn: {zero_ids} id-0 tokens; greedy with mask {with_mask.tolist()}, without {without_mask.tolist()}")
    save_file(logits, str(out / "logits.safetensors"))
    meta = {
        "generator": "tools/make_official_fixtures.py",
        "official_code": "mPLUG-Owl3-7B-240728 remote code",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "image_size": IMAGE_SIZE,
        "greedy_tokens": GREEDY_TOKENS,
        "stop_token_ids": stops,
        "cases": cases,
    }
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
