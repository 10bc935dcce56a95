"""kopf operator for CharacterFineTune resources.

Importing the package (or its pure modules: spec, runs, status, manifests, settings) registers no kopf handler and
reads no environment. `python -m finetune_operator` (see __main__.py) registers the handlers and runs them;
`kopf run -m finetune_operator.handlers` does the same with kopf's own command line.
"""
