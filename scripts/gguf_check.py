#!/usr/bin/env python3
"""Our Hugging Face export -> llama.cpp's convert_hf_to_gguf.py -> f32 GGUF -> llama.cpp's logits,
compared with ours on the same tokens (not part of the test suite: it needs llama.cpp).

    python scripts/gguf_check.py --llama-cpp ~/llama.cpp [--work /tmp/gguf_check]

Needs a llama.cpp checkout built with shared libraries (its README: `cmake -B build
-DBUILD_SHARED_LIBS=ON && cmake --build build --config Release`), the converter's Python
requirements (`pip install -r requirements/requirements-convert_hf_to_gguf.txt`, with torch pinned
to the one installed) and a C compiler. A random 4 x 256 model with the World vocabulary is
exported with `rwkv-sft convert --to hf`, converted to an f32 GGUF by llama.cpp's own script, and
run on 48 tokens by a 40-line C program against libllama; passes when every logit is within
2e-3 of our logits' range and the argmax agrees at >= 95% of positions.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

HARNESS = r"""
#include "llama.h"
#include <stdio.h>
// usage: logits MODEL.gguf TOKENS.txt OUT.f32 -> every position's logits, row after row
int main(int argc, char ** argv) {
    if (argc != 4) return 64;
    int32_t toks[1024]; int n = 0;
    FILE * f = fopen(argv[2], "r");
    while (n < 1024 && fscanf(f, "%d", &toks[n]) == 1) n++;
    fclose(f);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n + 16; cp.n_batch = n; cp.n_ubatch = n;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = toks[i]; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
    }
    b.n_tokens = n;
    if (llama_decode(ctx, b) != 0) { fprintf(stderr, "llama_decode failed\n"); return 2; }
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * o = fopen(argv[3], "wb");
    for (int i = 0; i < n; i++) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, o);
    fclose(o);
    llama_batch_free(b); llama_free(ctx); llama_model_free(model); llama_backend_free();
    return 0;
}
"""


def run(cmd, **kw):
    print("$", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def find_lib(build: Path) -> Path:
    for name in ("libllama.so", "libllama.dylib"):
        hits = sorted(build.glob(f"**/{name}"))
        if hits:
            return hits[0]
    sys.exit(f"no libllama.so under {build}: build llama.cpp with -DBUILD_SHARED_LIBS=ON first")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp checkout, built with shared libraries")
    p.add_argument("--build-dir", type=Path, help="where llama.cpp was built (default LLAMA_CPP/build)")
    p.add_argument("--work", type=Path, default=Path("gguf_check_work"))
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--hf-scheme", choices=("fla", "rwkv"), default="fla")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    llama, work = args.llama_cpp.resolve(), args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    from rwkv_sft import RWKV7, RWKV7Config
    from rwkv_sft.weights import load_model, save_model
    torch.manual_seed(args.seed)
    model = RWKV7(RWKV7Config(n_layer=4, n_embd=256, vocab_size=65536))
    with torch.no_grad():  # upstream init zeroes the output projections: perturb everything
        for t in model.parameters():
            t.add_(torch.randn_like(t) * 0.1)
    save_model(model, work / "model.pth")
    hf, gguf = work / "model-hf", work / "model-f32.gguf"
    run([sys.executable, "-m", "rwkv_sft", "convert", work / "model.pth", hf, "--to", "hf", "--hf-scheme", args.hf_scheme, "--overwrite"])
    run([sys.executable, llama / "convert_hf_to_gguf.py", hf, "--outfile", gguf, "--outtype", "f32"])

    lib = find_lib((args.build_dir or llama / "build").resolve())
    (work / "logits.c").write_text(HARNESS)
    run(["cc", "-O2", work / "logits.c", "-o", work / "logits", f"-I{llama / 'include'}", f"-I{llama / 'ggml' / 'include'}",
         f"-L{lib.parent}", "-lllama", f"-Wl,-rpath,{lib.parent}"])
    tokens = torch.randint(1, 65530, (args.tokens,), generator=torch.Generator().manual_seed(args.seed + 1))
    (work / "tokens.txt").write_text(" ".join(map(str, tokens.tolist())))
    run([work / "logits", gguf, work / "tokens.txt", work / "logits.f32"])
    theirs = torch.from_numpy(np.fromfile(work / "logits.f32", dtype=np.float32).reshape(args.tokens, -1))

    with torch.no_grad():
        ours = load_model(work / "model.pth").eval()(tokens[None])[0][0].float()
    V = min(ours.shape[-1], theirs.shape[-1])
    ours, theirs = ours[:, :V], theirs[:, :V]
    span = (ours.max() - ours.min()).item()
    diff = (ours - theirs).abs().max().item()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    ok = diff <= 2e-3 * span and agree >= 0.95
    print(f"| positions | vocab | logit range | max abs diff | diff / range | argmax agreement |\n"
          f"| --- | --- | --- | --- | --- | --- |\n"
          f"| {args.tokens} | {V} | {span:.4f} | {diff:.3e} | {diff / span:.2e} | {agree:.1%} |")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
