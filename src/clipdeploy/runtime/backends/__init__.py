"""Runtime backends. Each module declares and registers its own ``BackendSpec`` (see ``registry``); importing
them here, in this order, registers the built-in backends whichever module is imported first, and fixes the
order of ``--backend`` choices. The modules are light: ``onnxruntime``, ``openvino`` and ``tensorrt``
themselves are imported only when a runner is opened."""

from clipdeploy.runtime.backends import onnxruntime, tensorrt, openvino  # noqa: F401  (registers them)
