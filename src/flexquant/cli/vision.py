"""`flexquant vision quantize`: quantize a torchvision-style classifier on an image folder.

Flags are named like the fields of `VisionQuantConfig`. `main()` runs the command stand-alone (tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from ..vision.config import VisionQuantConfig
from ..vision.errors import VisionError

log = logging.getLogger(__name__)


def _add_quantize_args(q: argparse.ArgumentParser) -> None:
    d = VisionQuantConfig()
    q.add_argument("--model", required=True, help="resnet18, mobilenet_v2, regnet_x_400mf, ... or tiny_resnet")
    q.add_argument("--weights", help="FP weights as a .safetensors state dict (default: random init)")
    q.add_argument("--data", required=True, help="calibration images, ImageFolder layout (labels unused)")
    q.add_argument("--val", help="validation images, ImageFolder layout, for top-1 before and after")
    q.add_argument("--out", required=True, help="output folder of the quantized checkpoint")
    q.add_argument("--num-classes", type=int, help="default: the number of class folders (of --val, else --data)")
    q.add_argument("--image-size", type=int, default=224, help="images are resized and centre-cropped to this")
    q.add_argument("--mean", type=float, nargs=3, default=(0.485, 0.456, 0.406), help="normalisation mean (RGB)")
    q.add_argument("--std", type=float, nargs=3, default=(0.229, 0.224, 0.225), help="normalisation std (RGB)")
    q.add_argument("--calib-size", type=int, default=256, help="calibration images drawn from --data")
    q.add_argument("--w-bits", type=int, default=d.w_bits)
    q.add_argument("--a-bits", type=int, default=d.a_bits)
    q.add_argument("--first-last-bits", type=int, default=d.first_last_bits)
    q.add_argument("--iters", type=int, default=d.iters, help="reconstruction steps per block")
    q.add_argument("--batch-size", type=int, default=d.batch_size)
    q.add_argument("--meta", action="store_true", help="add the meta-learning step (transformation U-Net)")
    q.add_argument("--meta-steps", type=int, default=d.meta_steps, help="outer steps per block")
    q.add_argument("--seed", type=int, default=d.seed)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `vision` command (with its `quantize` subcommand) to the top-level CLI's subparsers."""
    p = subparsers.add_parser("vision", help="post-training quantization of image classifiers")
    sub = p.add_subparsers(dest="vision_command", required=True, metavar="{quantize}")
    q = sub.add_parser("quantize", help="quantize a classifier and report top-1 accuracy")
    _add_quantize_args(q)
    p.set_defaults(func=run)
    return p


def _quantize(args: argparse.Namespace) -> dict:
    from ..vision.api import evaluate_top1, quantize_classifier
    from ..vision.checkpoint import save_quantized
    from ..vision.data import iter_image_folder, list_image_folder, load_image_folder
    from ..vision.models import build_model, load_weights

    for flag in ("image_size", "calib_size"):
        if getattr(args, flag) < 1:
            raise VisionError(f"--{flag.replace('_', '-')} must be >= 1")
    config = VisionQuantConfig(
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        first_last_bits=args.first_last_bits,
        iters=args.iters,
        batch_size=args.batch_size,
        meta=args.meta,
        meta_steps=args.meta_steps,
        seed=args.seed,
        calib_size=args.calib_size,
    )
    num_classes = args.num_classes or len(list_image_folder(args.val or args.data)[2])
    model = build_model(args.model, num_classes)
    if args.weights:
        load_weights(model, args.weights)
    else:
        log.warning("no --weights given: quantizing a randomly initialised %s", args.model)
    model.eval()
    norm = dict(mean=args.mean, std=args.std)
    X_cal, _, _ = load_image_folder(args.data, args.image_size, limit=args.calib_size, seed=args.seed, **norm)
    if args.val and len(list_image_folder(args.val)[2]) > num_classes:
        raise VisionError(f"--val has more classes than the model's {num_classes} outputs; set --num-classes")

    t0 = time.perf_counter()
    qmodel = quantize_classifier(model, X_cal, config, progress=sys.stderr.isatty())
    metrics: dict = {"quantize_seconds": round(time.perf_counter() - t0, 2), **qmodel.storage_bits()}
    if args.val:  # streamed: a validation set need not fit in memory
        metrics["fp_top1"] = evaluate_top1(model, iter_image_folder(args.val, args.image_size, **norm))
        metrics["quant_top1"] = evaluate_top1(qmodel, iter_image_folder(args.val, args.image_size, **norm))
    qmodel.metrics = metrics
    out = save_quantized(qmodel, args.out)
    metrics["out"] = str(out)
    return metrics


def run(args: argparse.Namespace) -> int:
    """Run a parsed `vision` command; user errors print one line to stderr and return 2."""
    try:
        if args.vision_command == "quantize":
            metrics = _quantize(args)
            sys.stdout.write(json.dumps(metrics) + "\n")
            return 0
        raise VisionError(f"unknown vision command {args.vision_command!r}")
    except VisionError as exc:
        sys.stderr.write(f"flexquant vision: error: {exc}\n")
        return 2


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: the arguments after ``flexquant vision``."""
    parser = argparse.ArgumentParser(prog="flexquant")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["vision", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)
