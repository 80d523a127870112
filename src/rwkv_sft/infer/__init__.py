"""Decoding: `Decoder` (infer.decoder) over the fused one-token step (infer.step); generation (infer.generate) and the `generate` command (infer.cli)."""

# A sampling temperature below this is greedy decoding: dividing logits by a tinier one overflows
# (NaN probabilities), and a temperature this small already picks the most likely token.
GREEDY_BELOW = 1e-4
