"""`infgen` command line: decode a latent file to an image of any size; list the presets; set up the offline
photos and VAEs."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .vae import OFFLINE_VAES


def parse_cli_size(text: str) -> tuple[int, int]:
    """'3840x2160' (WIDTHxHEIGHT, as screens are named) or '4096' (square) → (H, W)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be WIDTHxHEIGHT or N, got {text!r}") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[1], values[0]
    raise argparse.ArgumentTypeError(f"--size must be WIDTHxHEIGHT or N, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infgen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    decode = commands.add_parser("decode", help="decode a latent file to an image of any size")
    decode.add_argument("--model", required=True, help="directory written by InfGen.save_pretrained")
    decode.add_argument("--latent", required=True, help=".pt, .npy or .safetensors with (C,h,w) or (B,C,h,w)")
    decode.add_argument("--size", required=True, type=parse_cli_size, help="WIDTHxHEIGHT (3840x2160) or N (4096)")
    decode.add_argument("--out", required=True, help="output image (.png, .jpg, ...); a batch gets _0, _1, ...")
    decode.add_argument("--tile", type=int, default=None, help="decode in tiles of N×N output pixels")
    decode.add_argument("--iterative", action="store_true", help="2× steps with VAE re-encoding up to --size")
    decode.add_argument("--vae", default=None, help="VAE for --iterative: hub id, diffusers directory or 'tiny'")
    decode.add_argument("--unscaled", action="store_true", help="latents are raw VAE means, not ×scaling_factor")
    decode.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    commands.add_parser("presets", help="list the model presets and their parameter counts")

    setup = commands.add_parser("setup", help="fetch the wallpaper photos and fit the offline VAEs (once; cached)")
    setup.add_argument("vaes", nargs="*", default=list(OFFLINE_VAES), help="offline VAEs to fit (default: all)")
    return parser


def run_setup(args: argparse.Namespace) -> None:
    import logging

    from .photos import SPLITS, load_photos, photos_dir
    from .vae import materialise_offline_vae

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    photos = load_photos()
    counts = ", ".join(f"{sum(p.split == s for p in photos)} {s}" for s in SPLITS)
    print(f"photos: {counts} files in {photos_dir()} ({photos[0].source}, ...)")
    for name in args.vaes:
        print(f"VAE {name}: {materialise_offline_vae(name)}")


def run_decode(args: argparse.Namespace) -> list[Path]:
    from .images import to_pil
    from .io import load_latents
    from .models import InfGen
    from .upsample import iterative_decode
    from .vae import load_vae

    if args.iterative and not args.vae:
        raise ValueError("--iterative needs --vae (the encoder that re-encodes each 2× step)")
    model = InfGen.from_pretrained(args.model).to(args.device).eval()
    latents = load_latents(args.latent).to(args.device)
    start = time.perf_counter()
    if args.iterative:
        vae = load_vae(args.vae, device=args.device)
        images = iterative_decode(model, vae, latents, args.size, tile=args.tile, scaled=not args.unscaled)
    else:
        images = model.decode(latents, args.size, tile=args.tile, scaled=not args.unscaled)
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        to_pil(image).save(path)
    height, width = args.size
    print(f"decoded {len(images)} latent(s) {tuple(latents.shape[1:])} to {width}x{height} in {elapsed:.2f} s: "
          + ", ".join(map(str, paths)))
    return paths


def run_presets() -> None:
    from .models import INFGEN_PRESETS, InfGen

    print(f"{'preset':<8} {'parameters':>12}")
    for name in INFGEN_PRESETS:
        print(f"{name:<8} {InfGen.from_preset(name).num_params() / 1e6:>11.1f}M")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "decode":
            run_decode(args)
        elif args.command == "setup":
            run_setup(args)
        else:
            run_presets()
    except ValueError as e:
        print(f"infgen: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
