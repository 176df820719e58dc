"""``offset serve``: REST service and web page over a search index (FastAPI + uvicorn, loopback by default)."""
from __future__ import annotations

import argparse
import ipaddress
import logging

NAME = "serve"
HELP = "REST service and web page over a search index"
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index folder made by `offset index`")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    parser.add_argument("--checkpoint", default=None, help="override the checkpoint recorded in the index")
    parser.add_argument("--captioner", default=None, help="mask pipeline: local captioner model folder")
    parser.add_argument("--segmenter", default=None, help="mask pipeline: local CLIPSeg model folder")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body in MiB")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="largest uploaded image in pixels")
    parser.add_argument("--max-concurrency", type=int, default=8,
                        help="searches running at once (decoding, encoding, ranking); others wait for a slot "
                             "(default 8)")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="queries of concurrent searches encoded together in one model call at most; 1 encodes "
                             "each alone (default 8)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="milliseconds the encoder waits for searches on their way to join a batch (default 5)")
    add_precision_argument(parser, "auto")
    parser.add_argument("--queue-timeout", type=float, default=30.0,
                        help="seconds a search may wait for a slot before it gets 503 (default 30)")
    parser.add_argument("--max-connections", type=int, default=512,
                        help="open connections beyond which new requests get 503 at once; an exhaustion guard, "
                             "not a load limit (default 512)")
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds for a request's line and headers to arrive (default 10)")
    parser.add_argument("--write-timeout", type=float, default=30.0,
                        help="seconds a client may read nothing of a response before it is disconnected (default 30)")
    parser.add_argument("--body-timeout", type=float, default=30.0,
                        help="seconds for a request body to arrive in full (default 30)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a name clients may use in the Host header besides the bound address, localhost, "
                             "127.0.0.1 and [::1] (repeatable; '*' allows any, e.g. behind a proxy)")
    parser.add_argument("--max-k", type=int, default=100, help="largest number of results one search may ask for")
    parser.add_argument("--exact", action="store_true", help="exact search even when the index has FAISS")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                        help="encode queries with torch or onnxruntime (CPU); the same rankings within float "
                             "tolerance")
    parser.add_argument("--onnx", default=None, metavar="DIR",
                        help="--runtime onnx: folder made by `offset export` (no checkpoint needed then; default: "
                             "export the checkpoint at start-up)")
    from offset_cir.commands._baseline_flags import add_query_baseline_arguments

    add_query_baseline_arguments(parser)


def add_precision_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """``--precision`` (serve, search, index, eval)."""
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default=default,
                        help="the encoder's precision: fp32, bf16, or auto = bf16 where a short calibration at start-up "
                             "measures it faster on this machine for this model and its features agree with fp32's "
                             f"(cosine >= 0.999), fp32 otherwise (default {default})")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from offset_cir.errors import UserInputError
    from offset_cir.search.index import Index
    from offset_cir.search.inputs import make_mask_generator
    from offset_cir.search.service import allowed_host_names, create_app, make_server

    for name, value in (("--queue-timeout", args.queue_timeout), ("--header-timeout", args.header_timeout),
                        ("--body-timeout", args.body_timeout), ("--max-connections", args.max_connections),
                        ("--max-concurrency", args.max_concurrency), ("--write-timeout", args.write_timeout),
                        ("--max-upload-mb", args.max_upload_mb), ("--max-batch", args.max_batch)):
        if not value > 0:
            raise UserInputError(f"{name} must be positive, got {value}")
    if not args.batch_wait_ms >= 0:
        raise UserInputError(f"--batch-wait-ms must be 0 or more, got {args.batch_wait_ms}")
    allowed_host_names(args.host, args.allowed_host)  # a bad --allowed-host is refused before the model loads
    if not _is_loopback(args.host):
        wildcard = args.host in ("0.0.0.0", "::", "")
        log.warning("binding %s: the service is reachable from other machines; it has no authentication. "
                    "Requests must name %s in their Host header: add --allowed-host for the name or address "
                    "clients use", args.host, "localhost" if wildcard else args.host + ", localhost")
    index = Index.open(args.index, checkpoint=args.checkpoint, device=args.device, exact=args.exact,
                       runtime=args.runtime, onnx_dir=args.onnx, precision=args.precision,
                       baseline=args.baseline, pretrained=args.pretrained,
                       mask_generator=make_mask_generator(args.captioner, args.segmenter, args.device))
    app = create_app(index, max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_pixels=args.max_pixels,
                     max_concurrency=args.max_concurrency, max_k=args.max_k, queue_timeout=args.queue_timeout,
                     body_timeout=args.body_timeout, max_batch=args.max_batch, batch_wait=args.batch_wait_ms / 1e3,
                     host=args.host, allowed_hosts=args.allowed_host)
    if index.baseline is not None:
        print(f"queries: {index.model.label()} (no mask)", flush=True)
    print(f"queries: {index.precision.describe()}; batches of up to {args.max_batch}", flush=True)
    print(f"serving {args.index} ({len(index)} images) on http://{args.host}:{args.port}/", flush=True)
    make_server(app, host=args.host, port=args.port, header_timeout=args.header_timeout,
                write_timeout=args.write_timeout, max_connections=args.max_connections).run()
    return 0
