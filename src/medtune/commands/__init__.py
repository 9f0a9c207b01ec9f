"""One module per command (or family of commands): each holds its parser(s), built by `register(subparsers)`
(which sets `func=` on every parser it adds), beside the handlers `medtune.cli` calls.

  train.py     train                      data.py    data check
  generate.py  generate, chat, compare    serve.py   serve
  eval.py      eval, gate                 bench.py   bench train|scale|generate|serve|eval
  export.py    merge, export, push        ui.py      ui
  common.py    what they share: flags → options (args_for, options_from_args), the command line, side by side
"""
