"""`medtune serve`: an OpenAI-compatible HTTP API for a base model and its adapters."""

from __future__ import annotations

import os

from medtune.commands.common import args_for, device_arg
from medtune.lazy import lazy

app = lazy("medtune.serve.app")


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API for a base model and its adapters",
                       description="Serve a model or run over an OpenAI-compatible API (/v1/chat/completions, "
                       "/v1/completions, /v1/models, /health, /openapi.json). The request's `model` field picks the "
                       "base or an adapter. Requests wait in a bounded queue (429 when full) and are answered "
                       "in batches of up to --max-batch. Not medical advice.")
    p.add_argument("model", help="model name, model folder or run directory (a run's adapter is served under the "
                   "run folder's name, its base under the base's name), or a .gguf file (run by llama.cpp, one "
                   "request at a time, no --adapter: pip install 'medtune[gguf]')")
    p.add_argument("--adapter", action="append", metavar="NAME=RUN", help="also serve the adapter of run directory "
                   "RUN as model NAME (repeatable; every run must be trained on the same base)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes "
                   "(default: $MEDTUNE_API_KEY, else no key). Without a key only requests whose Host header is "
                   "localhost, 127.0.0.1, [::1] or --host are served (421 otherwise: DNS rebinding)")
    p.add_argument("--allow-no-key", action="store_true", help="serve a non-loopback --host (e.g. 0.0.0.0) "
                   "without an API key (refused otherwise)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body; bigger ones are "
                   "413 before they are read (default 1 MiB)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get HTTP 429")
    p.add_argument("--max-tokens", type=int, default=512, help="cap on a request's max_tokens (and the default)")
    p.add_argument("--max-batch", type=int, default=4, help="waiting requests answered together in one batch "
                   "(1 = one at a time)")
    device_arg(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    app.run_server(args.model, args.adapter or [],
                   **args_for(app.run_server, args, api_key=args.api_key or os.environ.get(app.API_KEY_ENV) or None))
    return 0
