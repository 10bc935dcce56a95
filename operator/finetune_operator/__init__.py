"""kopf operator for CharacterFineTune resources.

`kopf run -m finetune_operator` imports this package, which registers the handlers; `python -m finetune_operator`
does the same with flags and environment variables of its own (see __main__.py).
"""

from . import handlers as handlers
