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
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--checkpoint", default=None, help="override the checkpoint recorded in the index")
    parser.add_argument("--captioner", default=None, help="mask pipeline: local captioner model folder")
    parser.add_argument("--segmenter", default=None, help="mask pipeline: local CLIPSeg model folder")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body in MiB")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="largest uploaded image in pixels")
    parser.add_argument("--max-concurrency", type=int, default=2, help="searches running at once")
    parser.add_argument("--max-k", type=int, default=100)
    parser.add_argument("--exact", action="store_true", help="exact search even when the index has FAISS")
    parser.add_argument("--device", default=None)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from offset_cir.search.index import Index, make_mask_generator
    from offset_cir.search.service import create_app

    if not _is_loopback(args.host):
        log.warning("binding %s: the service is reachable from other machines; it has no authentication",
                    args.host)
    index = Index.open(args.index, checkpoint=args.checkpoint, device=args.device, exact=args.exact,
                       mask_generator=make_mask_generator(args.captioner, args.segmenter, args.device))
    app = create_app(index, max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_pixels=args.max_pixels,
                     max_concurrency=args.max_concurrency, max_k=args.max_k)
    print(f"serving {args.index} ({len(index)} images) on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="info",
                limit_concurrency=max(8, 4 * args.max_concurrency), timeout_keep_alive=5)
    return 0
