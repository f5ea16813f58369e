"""Collection for the whole checkout (pytest's ``testpaths`` are ``tests`` and ``adaprec``, the latter for the
docstring examples).

The integration modules import their library at the top (their classes derive from its callback class),
so their examples cannot even be imported without it: leave them out when the library is absent (an
install without the ``lightning``/``hf`` extras). Their tests in ``tests/`` skip and say why.
"""

from __future__ import annotations

import importlib.util


def _missing(*names: str) -> bool:
    return all(importlib.util.find_spec(n) is None for n in names)


collect_ignore: list[str] = []
if _missing("lightning", "pytorch_lightning"):
    collect_ignore.append("adaprec/integrations/lightning.py")
if _missing("transformers"):
    collect_ignore.append("adaprec/integrations/transformers.py")
