"""actprompt: activation-prompt adaptation and multi-tenant serving for frozen vision backbones."""

__version__ = "0.1.0"
