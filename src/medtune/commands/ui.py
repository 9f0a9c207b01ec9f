"""`medtune ui`: a Gradio page with base and tuned answers side by side."""

from __future__ import annotations

from medtune.commands.common import args_for, device_arg
from medtune.lazy import lazy

web = lazy("medtune.ui")


def register(sub) -> None:
    p = sub.add_parser("ui", help="a web page with base and tuned answers side by side (Gradio)")
    p.add_argument("model", help="run directory (base vs tuned), or a model name/folder or .gguf file (one answer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to share on your network)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    p.add_argument("--system", default=None, help="system message (default: the run's)")
    p.add_argument("--template", default="auto", help="chat template for a plain model: auto, chatml, llama2")
    device_arg(p)
    p.set_defaults(func=cmd_ui)


def cmd_ui(args) -> int:
    print(f"medtune ui: open http://{args.host}:{args.port} (Ctrl-C stops). Not medical advice.", flush=True)
    web.launch_ui(args.model, **args_for(web.launch_ui, args))
    return 0

