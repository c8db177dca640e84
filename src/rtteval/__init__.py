"""rtteval: did this unlearning method remove the information from the weights, or only hide it?

The adversarial RTT evaluation of Deeb & Roger, "Do Unlearning Methods Remove
Information from Language Model Weights?" (arXiv 2410.08827).
"""

__version__ = "0.1.0"

from rtteval.errors import ConfigError, DataError, UserError

__all__ = ["ConfigError", "DataError", "UserError", "__version__"]
