"""A small stand-in for ``triton_python_backend_utils``, the module Triton's Python backend provides.

Only what clipdeploy's Python models use, with the same names and behaviour as the real module
(python_backend/src/resources/triton_python_backend_utils.py): tensors wrap numpy arrays, string
tensors are numpy object arrays of bytes, a response carries output tensors or a TritonError.
"""

import numpy as np

TRITON_STRING_TO_NUMPY = {
    "TYPE_BOOL": bool,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}


class TritonModelException(Exception):
    pass


class TritonError:
    def __init__(self, msg):
        self._msg = msg

    def message(self):
        return self._msg

    def __str__(self):
        return self._msg


class Tensor:
    def __init__(self, name, numpy_array):
        if not isinstance(numpy_array, np.ndarray):
            raise TritonModelException(f"tensor {name!r} must be a numpy array, got {type(numpy_array).__name__}")
        if numpy_array.dtype.type == np.str_:
            raise TritonModelException("Tensor dtype np.str_ is not supported by the Python backend; use np.object_")
        self._name = name
        self._array = numpy_array

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class InferenceRequest:
    def __init__(self, inputs, requested_output_names=()):
        self._inputs = inputs
        self._requested = list(requested_output_names)

    def inputs(self):
        return self._inputs

    def requested_output_names(self):
        return self._requested


class InferenceResponse:
    def __init__(self, output_tensors, error=None):
        if type(output_tensors) is not list:
            raise TritonModelException('"output_tensors" must be a list.')
        self._outputs = output_tensors
        self._error = error

    def output_tensors(self):
        return self._outputs

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error


def get_input_tensor_by_name(request, name):
    for t in request.inputs():
        if t.name() == name:
            return t
    return None


def get_output_tensor_by_name(response, name):
    for t in response.output_tensors():
        if t.name() == name:
            return t
    return None


def get_input_config_by_name(model_config, name):
    return next((i for i in model_config.get("input", []) if i["name"] == name), None)


def get_output_config_by_name(model_config, name):
    return next((o for o in model_config.get("output", []) if o["name"] == name), None)


def triton_string_to_numpy(triton_type_string):
    return TRITON_STRING_TO_NUMPY[triton_type_string]
