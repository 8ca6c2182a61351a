"""gpu_core: the science of Influence Dashboard, with no knowledge of any cloud or service.

Importing this package (and ``gpu_core.schemas``) does not import torch: the gateway validates
specs with the schemas alone. The pipeline lives in ``gpu_core.pipeline``.
"""
