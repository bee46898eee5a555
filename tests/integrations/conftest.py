from __future__ import annotations

import os

# LiteLLM fetches its price list from the network at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
