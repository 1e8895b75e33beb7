"""The filter's passes at BLIP-base size (defaults of transformers' BlipConfig, random weights) on the CPU:
the ViT, the unimodal text pass (ITC), and the ITM pass with the image's cross-attention keys and values
projected per caption (before 2026-11-26) or once per image (``ImageKeysValues``), and both text passes with
the last layer computing the first token alone (``first_token_only``, what the filter runs now). IMAGES images
(default 8) at 384 px, CAPTIONS candidates each (default 2: the alt-text and one synthetic), 20 tokens.

    python docs/scripts/cpu_filter_base.py [IMAGES] [CAPTIONS]
"""

import sys
import time

import torch

from capfilt.model.blip import BlipFilter

torch.manual_seed(0)
torch.set_grad_enabled(False)
images, captions = (int(a) for a in (sys.argv[1:] + ["8", "2"][len(sys.argv) - 1 :])[:2])
model = BlipFilter({}).eval()  # every size from the defaults: ViT-B/16 at 384 px, BERT-base
for table in (
    model.text_encoder.embeddings.word_embeddings,
    model.text_encoder.embeddings.position_embeddings,
):
    torch.nn.init.normal_(table.weight)  # left empty for a checkpoint to fill
text = model.text_encoder
pixels = torch.randn(images, 3, 384, 384)
rows = torch.arange(images).repeat_interleave(captions)
ids = torch.randint(1000, 30000, (len(rows), 20))
mask = torch.ones_like(ids)


def ms(fn, n: int = 3) -> list[float]:
    fn()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(round((time.perf_counter() - start) * 1000, 1))
    return out


from capfilt.model.vision import image_embeds  # noqa: E402

embeds = image_embeds(model.vision_model, pixels)
per_caption = text(ids, mask, encoder_hidden_states=embeds[rows]).last_hidden_state
once = text(ids, mask, image_kv=text.image_keys_values(embeds).for_rows(rows)).last_hidden_state
print(
    f"{images} images x {captions} captions, {torch.get_num_threads()} threads; max |difference| {(per_caption - once).abs().max():.1e}"
)
print("ViT (ms)", ms(lambda: image_embeds(model.vision_model, pixels)))
print("unimodal text pass, ITC (ms)", ms(lambda: text(ids, mask)))
print(
    "ITM pass, image projected per caption (ms)",
    ms(lambda: text(ids, mask, encoder_hidden_states=embeds[rows])),
)
print(
    "ITM pass, image projected once (ms)",
    ms(lambda: text(ids, mask, image_kv=text.image_keys_values(embeds).for_rows(rows))),
)
print(
    "unimodal text pass, first token only in the last layer (ms)",
    ms(lambda: text(ids, mask, first_token_only=True)),
)
print(
    "ITM pass, image projected once, first token only in the last layer (ms)",
    ms(
        lambda: text(ids, mask, image_kv=text.image_keys_values(embeds).for_rows(rows), first_token_only=True)
    ),
)
