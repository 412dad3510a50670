"""Prune a llava-hf checkpoint's visual tokens with one line, and see what was kept.

    python examples/quickstart.py [CHECKPOINT] [IMAGE] [--device cpu] [--dtype float32]

CHECKPOINT: a Hub id (default llava-hf/llava-1.5-7b-hf) or a local directory (offline: make one with
`vtprune checkpoint proxy DIR`). --device: cuda when there is one; --dtype: bfloat16 on CUDA, else float32.
"""

import argparse

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

import vtprune

parser = argparse.ArgumentParser(description="Prune a llava-hf checkpoint's visual tokens with one line.")
parser.add_argument("checkpoint", nargs="?", default="llava-hf/llava-1.5-7b-hf", help="Hub id or local directory")
parser.add_argument("image", nargs="?", help="an image file (default: an orange 640x480 picture)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
args = parser.parse_args()
dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
dtype = getattr(torch, dtype_name)
image = Image.open(args.image) if args.image else Image.new("RGB", (640, 480), "orange")

try:
    model = LlavaForConditionalGeneration.from_pretrained(args.checkpoint, dtype=dtype, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(args.checkpoint)
except OSError as error:  # offline, or no such checkpoint: say how to make a local one
    first_line = str(error).strip().splitlines()[0]
    parser.exit(2, f"cannot load {args.checkpoint!r} ({first_line}); offline, run: vtprune checkpoint proxy DIR\n")
model.to(args.device)
print(f"model: {args.checkpoint} on {args.device} in {dtype_name}")

# LLaVA answers sensibly only inside its chat template: "USER: <image>\n... ASSISTANT:".
conversation = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}
]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device, dtype)
prompt_length = inputs["input_ids"].shape[1]


def answer() -> str:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    return processor.decode(out[0, prompt_length:], skip_special_tokens=True)


print("unpruned:", answer())

with vtprune.apply(model, "divprune", keep=64) as handle:  # 64 of the image's visual tokens (576 on LLaVA-1.5)
    print("divprune, keep 64:", answer())
    print("visual tokens kept:", handle.last.kept_counts[0], "first indices:", handle.last.kept[0][:8].tolist())

# After the `with` block the model is exactly as it was.
print("unpruned again:", answer())
