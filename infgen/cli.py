"""`infgen` command line: decode a latent file to an image of any size; list the presets; set up the offline
photos and VAEs."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .images import IMAGE_FORMATS
from .vae import OFFLINE_VAES

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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

    decode = commands.add_parser("decode", help="decode latent files to images of any size")
    decode.add_argument("--model", required=True, help="directory written by InfGen.save_pretrained")
    decode.add_argument("--latent", required=True, nargs="+",
                        help="latent files (.pt, .npy, .safetensors with (C,h,w) or (B,C,h,w)) or directories of them")
    decode.add_argument("--size", required=True, nargs="+", type=parse_cli_size,
                        help="one or more WIDTHxHEIGHT (3840x2160) or N (4096)")
    decode.add_argument("--out", required=True,
                        help="an image file (one latent file, one size; a batch gets _0, _1, ...) or a directory "
                             "(several files or sizes: <stem>[_i]_<W>x<H>.<format>)")
    decode.add_argument("--format", choices=IMAGE_FORMATS, default="png", help="images written into a directory")
    decode.add_argument("--batch-size", type=int, default=1, help="latents of one shape decoded together")
    decode.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="weights and compute (fp16/bf16 on a GPU; on a CPU bf16 only where it is native)")
    decode.add_argument("--tile", type=int, default=None, help="decode in tiles of N×N output pixels")
    decode.add_argument("--iterative", action="store_true", help="2× steps with VAE re-encoding up to --size")
    decode.add_argument("--vae", default=None, help="VAE for --iterative: hub id, diffusers directory or an offline "
                        f"VAE ({', '.join(sorted(OFFLINE_VAES))})")
    decode.add_argument("--unscaled", action="store_true", help="latents are raw VAE means, not ×scaling_factor")
    decode.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    commands.add_parser("presets", help="list the model presets and their parameter counts")

    setup = commands.add_parser("setup", help="fetch the wallpaper photos and fit the offline VAEs (once; cached)")
    setup.add_argument("vaes", nargs="*", default=list(OFFLINE_VAES),
                       help=f"offline VAEs to fit: {', '.join(sorted(OFFLINE_VAES))} (default: all)")
    return parser


def run_setup(args: argparse.Namespace) -> None:
    import logging

    from .photos import SPLITS, load_photos, photos_dir
    from .vae import materialise_offline_vae

    unknown = [name for name in args.vaes if name not in OFFLINE_VAES]
    if unknown:  # before the photos are fetched
        raise ValueError(f"setup: {', '.join(map(repr, unknown))}: not an offline VAE "
                         f"({', '.join(sorted(OFFLINE_VAES))})")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    photos = load_photos()
    counts = ", ".join(f"{sum(p.split == s for p in photos)} {s}" for s in SPLITS)
    print(f"photos: {counts} files in {photos_dir()} ({photos[0].source}, ...)")
    for name in args.vaes:
        print(f"VAE {name}: {materialise_offline_vae(name)}")


def run_decode(args: argparse.Namespace) -> list[Path]:
    """Decode every latent of the inputs at every size; an unreadable file among several is skipped and counted
    (exit status 1), a single bad input is a ValueError (status 2)."""
    from tqdm import tqdm

    from .images import decode_in_batches, decoded_name, encode_image, to_pil
    from .io import find_latent_files, load_latents
    from .models import InfGen
    from .upsample import iterative_decode
    from .vae import load_vae

    if args.iterative and not args.vae:
        raise ValueError("--iterative needs --vae (the encoder that re-encodes each 2× step)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    files = find_latent_files(args.latent)
    out = Path(args.out)
    single = len(files) == 1 and len(args.size) == 1 and out.suffix != ""
    model = InfGen.from_pretrained(args.model).to(args.device, DTYPES[args.dtype]).eval()
    vae = load_vae(args.vae, device=args.device) if args.iterative else None

    def decode(latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if vae is not None:
            return iterative_decode(model, vae, latents, size, tile=args.tile, scaled=not args.unscaled)
        return model.decode(latents, size, tile=args.tile, scaled=not args.unscaled)

    written, failed, start = [], {}, time.perf_counter()
    with tqdm(total=len(files), unit="file", desc="decode", disable=single) as bar:
        for path in files:
            try:
                latents = load_latents(path).to(args.device)
                for size, i, image in decode_in_batches(decode, latents, args.size, args.batch_size):
                    if single:
                        target = out if i is None else out.with_name(f"{out.stem}_{i}{out.suffix}")
                        target.parent.mkdir(parents=True, exist_ok=True)
                        to_pil(image).save(target)  # the format its suffix names
                    else:
                        target = out / decoded_name(path.stem, i, size, args.format)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(encode_image(image, args.format))
                    written.append(target)
            except ValueError as e:  # unreadable, or not a latent this model takes
                if single:
                    raise
                failed[str(path)] = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
            bar.update()
    sizes = ", ".join(f"{w}x{h}" for h, w in args.size)
    print(f"decoded {len(files) - len(failed)} latent file(s) to {sizes}: {len(written)} image(s) in "
          f"{time.perf_counter() - start:.2f} s" + (f" → {written[0]}" if single else f" in {out}"))
    if failed:
        print(f"skipped {len(failed)} unreadable file(s):", file=sys.stderr)
        for problem in failed.values():
            print(f"  {problem}", file=sys.stderr)
    args.failed = failed
    return written


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
            if args.failed:
                return 1
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
