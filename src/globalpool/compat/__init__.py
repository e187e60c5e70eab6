"""Other libraries' pooling conventions, built on globalpool's kinds: one module per library
(``globalpool.compat.timm``, ...), so that switching is a change of import."""
