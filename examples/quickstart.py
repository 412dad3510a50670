"""Prune a llava-hf checkpoint's visual tokens with one line, and see what was kept.

    python examples/quickstart.py                                      # llava-hf/llava-1.5-7b-hf
    python examples/quickstart.py path/to/checkpoint path/to/image.jpg

Downloads the checkpoint from the Hugging Face Hub unless given a local directory.
"""

import sys

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

import vtprune

checkpoint = sys.argv[1] if len(sys.argv) > 1 else "llava-hf/llava-1.5-7b-hf"
image = Image.open(sys.argv[2]) if len(sys.argv) > 2 else Image.new("RGB", (640, 480), "orange")

model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa")
processor = AutoProcessor.from_pretrained(checkpoint)

# LLaVA answers sensibly only inside its chat template: "USER: <image>\n... ASSISTANT:".
conversation = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}
]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
prompt_length = inputs["input_ids"].shape[1]


def answer() -> str:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    return processor.decode(out[0, prompt_length:], skip_special_tokens=True)


print("unpruned:", answer())

with vtprune.apply(model, "divprune", keep=64) as handle:  # 64 of the image's 576 visual tokens
    print("divprune, keep 64:", answer())
    print("visual tokens kept:", handle.last.kept_counts[0], "first indices:", handle.last.kept[0][:8].tolist())

# After the `with` block the model is exactly as it was.
print("unpruned again:", answer())
