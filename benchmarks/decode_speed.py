"""Decode speed and peak memory of InfGen presets against the SD VAE decoder, in one run (see README.md).

Each case (a model and an output size) runs in a fresh child process of this script (`--case NAME:SIZE`),
because ru_maxrss is a per-process high-water mark: only a fresh process gives each case its own peak RSS.
The child prints one JSON line; the parent collects the lines, derives the ratios and writes the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the VAE is built from a config: never touch the hub

SDVAE = "sdvae"
SDVAE_SIZES = (512, 1024)  # native decodes only: latent side = size / 8
SDVAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), scaling_factor=0.18215, sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
LATENT_SIDE = 64  # InfGen always decodes one 64² latent (what SD 1.x makes for 512²), at any output size
GIB = 2 ** 30


# ---- child: one case ------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak RSS so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def build(name: str, size: int, device: str) -> tuple[Any, Callable[[int], Any], dict]:
    """The model, a decode function of the output size, and facts about the model."""
    import torch

    gen = torch.Generator().manual_seed(0)
    if name == SDVAE:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(**SDVAE_CONFIG).eval().to(device)
        info = {"params": sum(p.numel() for p in vae.parameters()),
                "decoder_params": sum(p.numel() for p in [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()])}

        @torch.no_grad()
        def decode(s: int):
            z = torch.randn(1, 4, s // 8, s // 8, generator=gen).to(device)
            return vae.decode(z / vae.config.scaling_factor).sample  # diffusers wants unscaled latents

        return vae, decode, info

    from infgen.models import InfGen

    model = InfGen.from_preset(name).eval().to(device)
    latents = torch.randn(1, 4, LATENT_SIDE, LATENT_SIDE, generator=gen).to(device)
    return model, lambda s: model.decode(latents, (s, s), tile=tile_for(s)), {"params": model.num_params()}


def tile_for(size: int) -> int | None:
    """Tiles above 2048²: untiled 4096² activations would not fit in a laptop's memory."""
    return ARGS.tile if size > ARGS.tile_above else None


def warmup_size(name: str, size: int) -> int:
    """Warm up at the full size only where that is cheap; otherwise at 512² (same kernels, less memory)."""
    return size if size <= (512 if name == SDVAE else ARGS.warmup_max_size) else 512


def run_case(case: str) -> dict:
    import torch

    name, size = case.rsplit(":", 1)
    size = int(size)
    if ARGS.threads:
        torch.set_num_threads(ARGS.threads)
    sync = torch.cuda.synchronize if ARGS.device.startswith("cuda") else (lambda: None)
    model, decode, info = build(name, size, ARGS.device)
    rss_built = peak_rss_bytes()
    for _ in range(ARGS.warmup):
        decode(warmup_size(name, size))
    sync()
    times = []
    for _ in range(ARGS.repeats):
        start = time.perf_counter()
        out = decode(size)
        sync()
        times.append(time.perf_counter() - start)
    peak = peak_rss_bytes()
    return {"case": case, "model": name, "size": size, "tile": None if name == SDVAE else tile_for(size),
            "output_shape": list(out.shape), "warmup": ARGS.warmup, "warmup_size": warmup_size(name, size),
            "times_s": times, "time_s": statistics.median(times),
            "rss_after_build_bytes": rss_built, "peak_rss_bytes": peak, "peak_rss_minus_build_bytes": peak - rss_built,
            "cuda_peak_bytes": torch.cuda.max_memory_allocated() if ARGS.device.startswith("cuda") else None,
            "torch": torch.__version__, "threads": torch.get_num_threads(), **info}


# ---- parent: all cases, ratios, report ------------------------------------------------------------------


def child_args() -> list[str]:
    args = ["--repeats", str(ARGS.repeats), "--warmup", str(ARGS.warmup), "--device", ARGS.device,
            "--tile", str(ARGS.tile), "--tile-above", str(ARGS.tile_above), "--warmup-max-size", str(ARGS.warmup_max_size)]
    return args + (["--threads", str(ARGS.threads)] if ARGS.threads else [])


def spawn(case: str) -> dict:
    """Run one case in a fresh interpreter; a failure (e.g. out of memory) becomes an error entry."""
    print(f"[decode_speed] {case} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, __file__, "--case", case, *child_args()],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        return {"case": case, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    result = json.loads(lines[-1])
    print(f"[decode_speed] {case}: {result['time_s']:.2f} s, peak RSS {result['peak_rss_bytes'] / GIB:.2f} GiB",
          file=sys.stderr, flush=True)
    return result


def ratio(name: str, num: dict | None, den: dict | None, target: float) -> dict | None:
    if not num or not den or "error" in num or "error" in den:
        return None
    value = num["time_s"] / den["time_s"]
    return {"name": name, "value": round(value, 4), "target": f"<= {target}", "meets_target": value <= target}


def derive(results: dict[str, dict], presets: list[str]) -> list[dict]:
    """The figures the design promises; each one only where both of its cases ran."""
    derived = []
    for p in presets:
        t = lambda s: results.get(f"{p}:{s}")
        derived += [ratio(f"{p}: t(2048)/t(1024) (4.0 = linear in pixels)", t(2048), t(1024), 4.4),
                    ratio(f"{p}: t(4096 tiled)/t(2048) (4.0 = linear in pixels)", t(4096), t(2048), 4.4)]
        # the speed target is the paper-scale preset's; smaller presets are listed for context
        derived += [ratio(f"{p}: t_infgen({s})/t_sdvae({s})", t(s), results.get(f"{SDVAE}:{s}"), 1.0)
                    for s in SDVAE_SIZES]
        big = t(4096)
        if big and "error" not in big:
            derived.append({"name": f"{p}: 4096² tiled peak RSS < 4 GiB", "value": round(big["peak_rss_bytes"] / GIB, 3),
                            "target": "< 4 GiB", "meets_target": big["peak_rss_bytes"] < 4 * GIB})
    return [d for d in derived if d]


def environment() -> dict:
    import torch

    from infgen.machine import describe_machine

    if ARGS.threads:
        torch.set_num_threads(ARGS.threads)
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            **describe_machine(), "device": ARGS.device, "command": sys.argv,
            "repeats": ARGS.repeats, "warmup": ARGS.warmup, "latent": [1, 4, LATENT_SIDE, LATENT_SIDE]}


def table(results: dict[str, dict], derived: list[dict]) -> str:
    rows = [f"{'case':<16}{'params':>12}{'time s':>10}{'peak RSS GiB':>14}{'- build GiB':>13}  note"]
    for case, r in results.items():
        if "error" in r:
            rows.append(f"{case:<16}{'':>12}{'':>10}{'':>14}{'':>13}  ERROR {r['error'][-80:]!r}")
            continue
        note = f"tile {r['tile']}" if r.get("tile") else ""
        rows.append(f"{case:<16}{r['params']:>12,}{r['time_s']:>10.2f}{r['peak_rss_bytes'] / GIB:>14.3f}"
                    f"{r['peak_rss_minus_build_bytes'] / GIB:>13.3f}  {note}")
    rows += [""] + [f"{d['name']:<52}{d['value']:>9}  {d['target']:<9} {'OK' if d['meets_target'] else 'MISSED'}"
                    for d in derived]
    return "\n".join(rows)


def main() -> None:
    if ARGS.case:  # child
        print(json.dumps(run_case(ARGS.case)), flush=True)
        return
    presets, sizes = ARGS.presets.split(","), [int(s) for s in ARGS.sizes.split(",")]
    cases = [f"{p}:{s}" for p in presets for s in sizes]
    if not ARGS.skip_vae:
        cases += [f"{SDVAE}:{s}" for s in SDVAE_SIZES if s in sizes]
    out = Path(ARGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"environment": environment(), "cases": {}, "derived": []}
    for case in cases:
        report["cases"][case] = spawn(case)
        report["derived"] = derive(report["cases"], presets)
        out.write_text(json.dumps(report, indent=2))  # after every case: a long run keeps what it measured
    print(table(report["cases"], report["derived"]))
    print(f"\nwrote {out}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/decode_speed.json")
    ap.add_argument("--presets", default="tiny,base,large", help="comma-separated infgen.models.INFGEN_PRESETS names")
    ap.add_argument("--sizes", default="512,1024,2048,4096", help="output sides; the SD VAE runs those of 512,1024")
    ap.add_argument("--skip-vae", action="store_true", help="leave out the SD VAE decoder baseline")
    ap.add_argument("--repeats", type=int, default=1, help="timed decodes per case (the median is reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed decodes before timing")
    ap.add_argument("--warmup-max-size", type=int, default=1024,
                    help="InfGen cases above this warm up at 512² (the SD VAE always warms up at 512²)")
    ap.add_argument("--tile", type=int, default=512, help="tile side for sizes above --tile-above")
    ap.add_argument("--tile-above", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a cluster")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one MODEL:SIZE case, print one JSON line
    return ap.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()
    main()
