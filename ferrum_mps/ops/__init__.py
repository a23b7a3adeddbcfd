"""torch.library ops of the `ferrum` namespace. Importing this module registers them."""

from . import moe  # noqa: F401,E402

from . import linear  # noqa: F401,E402

from . import attention  # noqa: F401,E402
from . import fused_linear  # noqa: F401,E402
from . import norm  # noqa: F401,E402
