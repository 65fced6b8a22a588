"""Recording stand-ins for ``tensorrt`` and ``cuda.bindings.runtime`` that check every use against the real bindings.

Used by the contract harness, in a process where the real (stubbed) TensorRT and cuda-python import.

- Every ``trt.X`` / ``cudart.X`` name is looked up in the real module; a missing name is a violation.
- Every method call is bound against the real signature: for TensorRT, parsed from the pybind11
  docstring (``name(self: tensorrt.X, arg: type = default) -> ret``, or the numbered overloads); for
  cuda-python, ``inspect.signature``. Argument count, names, keywords and the simple types (enum of
  the right kind, int, bool, str, buffer, TensorRT interface) must fit, or it is a violation.
- Property writes must hit a settable property.

To let the code under test run at all, the objects emulate a little: an ONNX parse reads the real
file's inputs, a build returns a plan that describes the network, an engine computes
``out[i, j] = mean(x[i]) * (j + 1)``, and device memory is host memory (with bounds checks on every
copy). None of that says anything about TensorRT's behaviour; only the API use is proven.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import re
import threading
from collections.abc import Callable
from typing import Any

import numpy as np


class Recorder:
    """Names used, calls made, and contract violations, for one scenario."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.calls: list[str] = []
        self.violations: list[str] = []
        self.lock = threading.Lock()

    def name(self, n: str) -> None:
        with self.lock:
            self.names.add(n)

    def call(self, c: str) -> None:
        with self.lock:
            self.calls.append(c)

    def violation(self, v: str) -> None:
        with self.lock:
            if v not in self.violations:
                self.violations.append(v)


class HarnessError(Exception):
    """The fake lacks an emulation the code under test needs: a gap in the harness, not a violation."""


# ---- signatures from pybind11 docstrings --------------------------------------------------------

_OPEN, _CLOSE = "([{<", ")]}>"


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


class Sig:
    """One published signature: an inspect.Signature plus each parameter's annotation text."""

    def __init__(self, text: str, signature: inspect.Signature, annotations: dict[str, str], returns: str) -> None:
        self.text = text
        self.signature = signature
        self.annotations = annotations
        self.returns = returns


def parse_signature(line: str, name: str) -> Sig | None:
    m = re.match(rf"^{re.escape(name)}\((.*)\)\s*->\s*(.+?)\s*$", line.strip())
    if not m:
        return None
    params, annotations = [], {}
    for i, part in enumerate(_split_top(m.group(1))):
        if part in ("*args", "**kwargs"):
            kind = inspect.Parameter.VAR_POSITIONAL if part == "*args" else inspect.Parameter.VAR_KEYWORD
            params.append(inspect.Parameter(part.strip("*"), kind))
            continue
        pname, _, rest = part.partition(":")
        ann, eq, default = rest.partition("=")
        pname = pname.strip()
        if i == 0 and pname == "self":
            continue
        # pybind11 names unnamed arguments arg0, arg1...: those cannot be passed by keyword.
        kind = (
            inspect.Parameter.POSITIONAL_ONLY
            if re.fullmatch(r"arg\d+", pname)
            else inspect.Parameter.POSITIONAL_OR_KEYWORD
        )
        params.append(inspect.Parameter(pname, kind, default=default.strip() if eq else inspect.Parameter.empty))
        annotations[pname] = ann.strip()
    sig = inspect.Signature(params, __validate_parameters__=False)
    return Sig(line.strip(), sig, annotations, m.group(2))


def signatures(func: Any, name: str) -> list[Sig]:
    """Every published signature of a pybind11 function, overloads included."""
    doc = (getattr(func, "__doc__", None) or "").strip()
    lines = [line.strip() for line in doc.splitlines()]
    if len(lines) > 1 and lines[1].startswith("Overloaded function"):
        found = [parse_signature(re.sub(r"^\d+\.\s*", "", line), name) for line in lines if re.match(r"^\d+\.\s", line)]
    else:
        found = [parse_signature(lines[0], name)] if lines else []
    return [
        s
        for s in found
        if s is not None and not any(p.kind == p.VAR_POSITIONAL for p in s.signature.parameters.values())
    ]


# ---- type checks for the simple annotation kinds ------------------------------------------------


def _is_enum_type(obj: Any) -> bool:
    return isinstance(obj, type) and hasattr(obj, "__members__")


def _resolve_trt(real: Any, ann: str) -> Any:
    """tensorrt_bindings.tensorrt.ILogger.Severity / nvinfer1::X / tensorrt.X -> the real object, or None."""
    ann = ann.split("::")[-1]
    for prefix in ("tensorrt_bindings.tensorrt.", "tensorrt.tensorrt.", "tensorrt."):
        if ann.startswith(prefix):
            ann = ann[len(prefix) :]
            break
    obj = real
    for part in ann.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def accepts(real: Any, ann: str, value: Any, default_is_none: bool) -> str | None:
    """None when ``value`` fits the annotation, else why not."""
    if value is None and default_is_none:
        return None
    base = ann.split("[")[0]
    if ann in ("", "object", "typing.Any"):
        return None
    if ann in ("int", "typing.SupportsInt"):
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and not _is_enum_type(type(value))
        return None if ok else f"{value!r} is not an int"
    if ann in ("float", "typing.SupportsFloat"):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else f"{value!r} is not a float"
    if ann == "bool":
        return None if isinstance(value, (bool, np.bool_)) else f"{value!r} is not a bool"
    if ann == "str":
        return None if isinstance(value, str) else f"{value!r} is not a str"
    if ann in ("buffer", "typing_extensions.Buffer"):
        try:
            memoryview(value)
        except TypeError:
            return f"{type(value).__name__} is not a buffer"
        return None
    if base in ("List", "list", "collections.abc.Sequence", "typing.Sequence", "tuple", "Tuple"):
        return None if isinstance(value, (list, tuple)) else f"{type(value).__name__} is not a sequence"
    target = _resolve_trt(real, ann) if ("tensorrt" in ann or "::" in ann) else None
    if target is None:
        return None  # an annotation this checker does not model: accept
    if _is_enum_type(target):
        return None if type(value) is target else f"{value!r} is not a {target.__name__}"
    if target.__name__ in ("Dims", "Dims32", "Dims64", "Dims2", "Dims3", "Dims4", "DimsHW"):
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in value):
            return None
        return None if isinstance(value, target) else f"{value!r} is not a shape"
    if isinstance(value, FakeObject):
        ok = issubclass(value._cls, target)
        return None if ok else f"a {value._cls.__name__} is not a {target.__name__}"
    return None if isinstance(value, target) else f"{type(value).__name__} is not a {target.__name__}"


def check_call(real: Any, rec: Recorder, where: str, sigs: list[Sig], args: tuple, kwargs: dict) -> Sig | None:
    """The first published signature the call binds to, or None after recording a violation."""
    shown = ", ".join([*(_short(a) for a in args), *(f"{k}={_short(v)}" for k, v in kwargs.items())])
    rec.call(f"{where}({shown})")
    if not sigs:
        rec.violation(f"{where}: no published signature to check the call against")
        return None
    reasons = []
    for sig in sigs:
        try:
            bound = sig.signature.bind(*args, **kwargs)
        except TypeError as e:
            reasons.append(str(e))
            continue
        bad = []
        for pname, value in bound.arguments.items():
            default = sig.signature.parameters[pname].default
            why = accepts(real, sig.annotations.get(pname, ""), value, default == "None")
            if why:
                bad.append(f"{pname}: {why}")
        if not bad:
            return sig
        reasons.append("; ".join(bad))
    rec.violation(
        f"{where}({shown}) matches no published signature [{' | '.join(s.text for s in sigs)}]: {' / '.join(reasons)}"
    )
    return None


def _short(v: Any) -> str:
    if isinstance(v, FakeObject):
        return f"<{v._cls.__name__}>"
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    text = repr(v)
    return text if len(text) < 60 else text[:57] + "..."


# ---- fake TensorRT ------------------------------------------------------------------------------


def _static(cls: type, name: str) -> Any:
    for klass in cls.__mro__:
        if name in vars(klass):
            return vars(klass)[name]
    return None


class FakeObject:
    """An instance of a real TensorRT class: attribute names, calls and property writes are checked."""

    def __init__(self, world: TrtWorld, cls: type, **state: Any) -> None:
        object.__setattr__(self, "_world", world)
        object.__setattr__(self, "_cls", cls)
        object.__setattr__(self, "_state", dict(state))

    def __getattr__(self, name: str) -> Any:
        world, cls = self._world, self._cls
        attr = _static(cls, name)
        where = f"{cls.__name__}.{name}"
        world.rec.name(where)
        if attr is None:
            world.rec.violation(f"{where} does not exist in TensorRT {world.version}")
            raise AttributeError(where)
        if isinstance(attr, property):
            if name in self._state:
                return self._state[name]
            return world.behave(self, name, None)
        sigs = signatures(attr, name)

        def method(*args: Any, **kwargs: Any) -> Any:
            sig = check_call(world.real, world.rec, where, sigs, args, kwargs)
            bound = {}
            if sig is not None:
                b = sig.signature.bind(*args, **kwargs)
                bound = dict(b.arguments)
            return world.behave(self, name, bound, sig)

        return method

    def __setattr__(self, name: str, value: Any) -> None:
        world = self._world
        attr = _static(self._cls, name)
        where = f"{self._cls.__name__}.{name}"
        world.rec.name(where)
        world.rec.call(f"{where} = {_short(value)}")
        if not isinstance(attr, property):
            world.rec.violation(f"{where} is not a property of TensorRT {world.version}; it cannot be set")
        elif attr.fset is None:
            world.rec.violation(f"{where} is read-only in TensorRT {world.version}")
        self._state[name] = value

    def __repr__(self) -> str:
        return f"<fake {self._cls.__name__}>"


class FakeEnum:
    """A real TensorRT enum type whose member lookups are checked."""

    def __init__(self, world: TrtWorld, name: str, enum: type) -> None:
        self._world, self._name, self._enum = world, name, enum

    def __getattr__(self, member: str) -> Any:
        where = f"tensorrt.{self._name}.{member}"
        self._world.rec.name(where)
        if member not in self._enum.__members__:
            self._world.rec.violation(f"{where} does not exist in TensorRT {self._world.version}")
            raise AttributeError(where)
        return self._enum.__members__[member]


class FakeClass:
    """A real TensorRT class: construction is checked against ``__init__``; nested names against the class."""

    def __init__(self, world: TrtWorld, cls: type) -> None:
        self._world, self._cls = world, cls

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        where = f"{self._cls.__name__}.__init__"
        sig = check_call(
            self._world.real, self._world.rec, where, signatures(self._cls.__init__, "__init__"), args, kwargs
        )
        obj = FakeObject(self._world, self._cls)
        bound = dict(sig.signature.bind(*args, **kwargs).arguments) if sig else {}
        self._world.behave(obj, "__init__", bound, sig)
        return obj

    def __getattr__(self, name: str) -> Any:
        where = f"tensorrt.{self._cls.__name__}.{name}"
        self._world.rec.name(where)
        value = getattr(self._cls, name, None)
        if value is None:
            self._world.rec.violation(f"{where} does not exist in TensorRT {self._world.version}")
            raise AttributeError(where)
        return FakeEnum(self._world, f"{self._cls.__name__}.{name}", value) if _is_enum_type(value) else value


# Interfaces the code subclasses (TensorRT calls back into them): handed over as the real classes.
SUBCLASSED = {"ILogger", "Logger", "IProgressMonitor", "IErrorRecorder", "IGpuAllocator", "IStreamReaderV2"}


class FakeTensorRT:
    """Stands in for the ``tensorrt`` module."""

    def __init__(self, world: TrtWorld) -> None:
        self._world = world
        self.__version__ = world.real.__version__

    def __getattr__(self, name: str) -> Any:
        world = self._world
        world.rec.name(f"tensorrt.{name}")
        value = getattr(world.real, name, None)
        if value is None:
            world.rec.violation(f"tensorrt.{name} does not exist in TensorRT {world.version}")
            raise AttributeError(name)
        if _is_enum_type(value):
            return FakeEnum(world, name, value)
        if isinstance(value, type):
            return value if name in SUBCLASSED else FakeClass(world, value)
        return value  # plain functions (nptype, volume) and constants


class FakeHostMemory(bytes):
    """An IHostMemory: a buffer, whose other attributes are checked against the real class."""

    world: TrtWorld

    def __getattr__(self, name: str) -> Any:
        where = f"IHostMemory.{name}"
        self.world.rec.name(where)
        if _static(self.world.real.IHostMemory, name) is None:
            self.world.rec.violation(f"{where} does not exist in TensorRT {self.world.version}")
            raise AttributeError(where)
        if name == "nbytes":
            return len(self)
        raise HarnessError(f"no emulation for {where}")


DTYPES = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64", "int32": "INT32"}


class TrtWorld:
    """The emulation behind the fakes, and the options a scenario turns (parser failure, build failure)."""

    def __init__(self, real: Any, cuda: CudaWorld, rec: Recorder) -> None:
        self.real = real
        self.version = real.__version__
        self.cuda = cuda
        self.rec = rec
        self.parse_fails = False
        self.build_fails = False
        self.logger: Any = None
        self.module = FakeTensorRT(self)

    def behave(self, obj: FakeObject, name: str, args: dict | None, sig: Sig | None = None) -> Any:
        handler = getattr(self, f"_{obj._cls.__name__}_{name}", None)
        if handler is not None:
            return handler(obj, args or {})
        if args is None:
            raise HarnessError(f"no emulation for property {obj._cls.__name__}.{name}")
        returns = sig.returns if sig else ""
        if returns == "bool":
            return True
        if returns == "None":
            return None
        target = _resolve_trt(self.real, returns)
        if isinstance(target, type) and not _is_enum_type(target):
            return FakeObject(self, target)
        raise HarnessError(f"no emulation for {obj._cls.__name__}.{name} -> {returns}")

    # -- builder --
    def _Builder___init__(self, obj: FakeObject, a: dict) -> None:
        self.logger = a.get("logger")

    def _Builder_create_network(self, obj: FakeObject, a: dict) -> FakeObject:
        return FakeObject(self, self.real.INetworkDefinition, _flags=a.get("flags", 0), _inputs=[], _outputs=[])

    def _OnnxParser___init__(self, obj: FakeObject, a: dict) -> None:
        obj._state["_network"] = a.get("network")

    def _OnnxParser_parse_from_file(self, obj: FakeObject, a: dict) -> bool:
        if self.parse_fails:
            obj._state["_errors"] = [
                ("/visual/attn/Softmax_3", "Softmax", "unsupported data type BF16", 41),
                ("", "", "invalid graph: dangling output", -1),
            ]
            return False
        import onnx

        model = onnx.load(a["model"], load_external_data=False)
        types = {
            onnx.TensorProto.FLOAT: "float32",
            onnx.TensorProto.FLOAT16: "float16",
            onnx.TensorProto.INT64: "int64",
            onnx.TensorProto.INT32: "int32",
        }

        def io(values: Any) -> list[dict]:
            out = []
            for v in values:
                t = v.type.tensor_type
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
                out.append({"name": v.name, "dtype": types[t.elem_type], "shape": dims})
            return out

        net = obj._state["_network"]
        net._state["_inputs"] = io(model.graph.input)
        net._state["_outputs"] = io(model.graph.output)
        return True

    def _OnnxParser_num_errors(self, obj: FakeObject, a: Any) -> int:
        return len(obj._state.get("_errors", []))

    def _OnnxParser_get_error(self, obj: FakeObject, a: dict) -> FakeObject:
        name, op, desc, node = obj._state["_errors"][a["index"]]
        return FakeObject(self, self.real.ParserError, _e=(name, op, desc, node))

    def _ParserError_node_name(self, obj: FakeObject, a: dict) -> str:
        return obj._state["_e"][0]

    def _ParserError_node_operator(self, obj: FakeObject, a: dict) -> str:
        return obj._state["_e"][1]

    def _ParserError_desc(self, obj: FakeObject, a: dict) -> str:
        return obj._state["_e"][2]

    def _ParserError_node(self, obj: FakeObject, a: dict) -> int:
        return obj._state["_e"][3]

    def _INetworkDefinition_num_inputs(self, obj: FakeObject, a: Any) -> int:
        return len(obj._state["_inputs"])

    def _INetworkDefinition_get_input(self, obj: FakeObject, a: dict) -> FakeObject:
        t = obj._state["_inputs"][a["index"]]
        return FakeObject(self, self.real.ITensor, name=t["name"], shape=self.real.Dims(t["shape"]))

    def _Builder_create_builder_config(self, obj: FakeObject, a: dict) -> FakeObject:
        return FakeObject(self, self.real.IBuilderConfig, _profiles=[], _flags=set())

    def _IBuilderConfig_set_flag(self, obj: FakeObject, a: dict) -> None:
        obj._state["_flags"].add(a["flag"].name)

    def _IBuilderConfig_clear_flag(self, obj: FakeObject, a: dict) -> None:
        obj._state["_flags"].discard(a["flag"].name)

    def _IBuilderConfig_create_timing_cache(self, obj: FakeObject, a: dict) -> FakeObject:
        data = bytes(memoryview(a["serialized_timing_cache"]))
        entries = set(json.loads(data)) if data else set()
        return FakeObject(self, self.real.ITimingCache, _entries=entries)

    def _ITimingCache_combine(self, obj: FakeObject, a: dict) -> bool:
        obj._state["_entries"] |= a["input_cache"]._state["_entries"]
        return True

    def _ITimingCache_serialize(self, obj: FakeObject, a: dict) -> FakeHostMemory:
        return self._host(json.dumps(sorted(obj._state["_entries"])).encode())

    def _IBuilderConfig_set_timing_cache(self, obj: FakeObject, a: dict) -> bool:
        obj._state["_timing_cache"] = a["cache"]
        return True

    def _IBuilderConfig_get_timing_cache(self, obj: FakeObject, a: dict) -> FakeObject:
        return obj._state["_timing_cache"]

    def _Builder_create_optimization_profile(self, obj: FakeObject, a: dict) -> FakeObject:
        return FakeObject(self, self.real.IOptimizationProfile, _shapes={})

    def _IOptimizationProfile_set_shape(self, obj: FakeObject, a: dict) -> None:
        obj._state["_shapes"][a["input"]] = [list(a["min"]), list(a["opt"]), list(a["max"])]

    def _IBuilderConfig_add_optimization_profile(self, obj: FakeObject, a: dict) -> int:
        obj._state["_profiles"].append(a["profile"]._state["_shapes"])
        return len(obj._state["_profiles"]) - 1

    def _host(self, data: bytes) -> FakeHostMemory:
        mem = FakeHostMemory(data)
        mem.world = self
        return mem

    def _Builder_build_serialized_network(self, obj: FakeObject, a: dict) -> Any:
        network, config = a["network"], a["config"]
        if self.build_fails:
            self.logger.log(
                self.real.ILogger.Severity.ERROR, "[optimizer.cpp::computeCosts] Out of memory: 9 GiB asked"
            )
            return None
        cache = config._state.get("_timing_cache")
        if cache is not None:
            profile = (config._state["_profiles"] or [{}])[0]
            cache._state["_entries"].add(f"tactic-{network._state['_inputs'][0]['name']}-{json.dumps(profile)}")
        plan = {
            "inputs": network._state["_inputs"],
            "outputs": network._state["_outputs"],
            "profile": (config._state["_profiles"] or [{}])[0],
            "flags": sorted(config._state["_flags"]),
            "strongly_typed": bool(
                network._state["_flags"] & (1 << int(self.real.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
            ),
        }
        return self._host(json.dumps(plan).encode())

    # -- runtime --
    def _Runtime___init__(self, obj: FakeObject, a: dict) -> None:
        obj._state["engine_host_code_allowed"] = False

    def _Runtime_deserialize_cuda_engine(self, obj: FakeObject, a: dict) -> Any:
        plan = json.loads(bytes(memoryview(a["serialized_engine"])))
        if "VERSION_COMPATIBLE" in plan["flags"] and not obj._state["engine_host_code_allowed"]:
            return None  # TensorRT refuses plans with host code unless allowed
        io = plan["inputs"] + plan["outputs"]
        return FakeObject(self, self.real.ICudaEngine, _plan=plan, _io=io, _inputs={t["name"] for t in plan["inputs"]})

    def _ICudaEngine_num_io_tensors(self, obj: FakeObject, a: Any) -> int:
        return len(obj._state["_io"])

    def _ICudaEngine_device_memory_size_v2(self, obj: FakeObject, a: Any) -> int:
        return 4096

    def _ICudaEngine_get_tensor_name(self, obj: FakeObject, a: dict) -> str:
        return obj._state["_io"][a["index"]]["name"]

    def _tensor(self, engine: FakeObject, name: str) -> dict:
        for t in engine._state["_io"]:
            if t["name"] == name:
                return t
        raise HarnessError(f"no tensor {name!r}")

    def _ICudaEngine_get_tensor_mode(self, obj: FakeObject, a: dict) -> Any:
        mode = "INPUT" if a["name"] in obj._state["_inputs"] else "OUTPUT"
        return self.real.TensorIOMode.__members__[mode]

    def _ICudaEngine_get_tensor_dtype(self, obj: FakeObject, a: dict) -> Any:
        return self.real.DataType.__members__[DTYPES[self._tensor(obj, a["name"])["dtype"]]]

    def _ICudaEngine_get_tensor_shape(self, obj: FakeObject, a: dict) -> Any:
        return self.real.Dims(self._tensor(obj, a["name"])["shape"])

    def _ICudaEngine_get_tensor_profile_shape(self, obj: FakeObject, a: dict) -> list:
        lo, opt, hi = obj._state["_plan"]["profile"][a["name"]]
        return [self.real.Dims(lo), self.real.Dims(opt), self.real.Dims(hi)]

    def _ICudaEngine_create_execution_context(self, obj: FakeObject, a: dict) -> FakeObject:
        return FakeObject(self, self.real.IExecutionContext, _engine=obj, _shapes={}, _addresses={}, _memory=None)

    def _IExecutionContext_set_device_memory(self, obj: FakeObject, a: dict) -> None:
        self.cuda.check_range(a["memory"], a["size"], "IExecutionContext.set_device_memory")
        obj._state["_memory"] = a["memory"]

    def _IExecutionContext_set_input_shape(self, obj: FakeObject, a: dict) -> bool:
        engine = obj._state["_engine"]
        lo, _, hi = engine._state["_plan"]["profile"].get(a["name"], [self._tensor(engine, a["name"])["shape"]] * 3)
        shape = list(a["shape"])
        if len(shape) != len(lo) or not all(x <= s <= y for s, x, y in zip(shape, lo, hi, strict=True)):
            return False
        obj._state["_shapes"][a["name"]] = shape
        return True

    def _IExecutionContext_get_tensor_shape(self, obj: FakeObject, a: dict) -> Any:
        engine = obj._state["_engine"]
        if a["name"] in engine._state["_inputs"]:
            return self.real.Dims(obj._state["_shapes"][a["name"]])
        batch = next(iter(obj._state["_shapes"].values()))[0]
        return self.real.Dims([batch, *self._tensor(engine, a["name"])["shape"][1:]])

    def _IExecutionContext_set_tensor_address(self, obj: FakeObject, a: dict) -> bool:
        obj._state["_addresses"][a["name"]] = a["memory"]
        return True

    def _IExecutionContext_execute_async_v3(self, obj: FakeObject, a: dict) -> bool:
        engine = obj._state["_engine"]
        if obj._state["_memory"] is None:
            raise HarnessError("execute_async_v3 before set_device_memory on a USER_MANAGED context")
        inputs = [t for t in engine._state["_plan"]["inputs"]]
        outputs = [t for t in engine._state["_plan"]["outputs"]]
        shapes = dict(obj._state["_shapes"])
        addresses = dict(obj._state["_addresses"])
        out_shapes = {t["name"]: [shapes[inputs[0]["name"]][0], *t["shape"][1:]] for t in outputs}

        def compute() -> None:
            t = inputs[0]
            x = self.cuda.array(addresses[t["name"]], np.dtype(t["dtype"]), shapes[t["name"]])
            row = x.reshape(len(x), -1).astype(np.float64).mean(axis=1)
            for o in outputs:
                out = self.cuda.array(addresses[o["name"]], np.dtype(o["dtype"]), out_shapes[o["name"]])
                out[...] = (row[:, None] * np.arange(1, out.shape[1] + 1)).astype(out.dtype)

        self.cuda.enqueue(a["stream_handle"], compute)
        return True


# ---- fake cuda-python runtime -------------------------------------------------------------------


class CudaWorld:
    """Host-memory emulation of the CUDA runtime calls the code makes, checked against cuda-python."""

    def __init__(self, real: Any, rec: Recorder) -> None:
        import cuda.bindings

        self.real = real
        self.version = str(cuda.bindings.__version__)
        self.rec = rec
        self.no_gpu = False
        self.allocations: dict[int, Any] = {}  # address -> ctypes buffer
        self.allow_foreign = False  # accept addresses outside our allocations (a caller's torch tensors)
        self.capturing: dict[int, list[Callable[[], None]]] = {}
        self.graphs: dict[int, list[Callable[[], None]]] = {}
        self.lock = threading.Lock()
        self._next = 0x1000
        self.module = FakeCudart(self)

    def handle(self) -> int:
        with self.lock:
            self._next += 0x10
            return self._next

    def alloc(self, size: int) -> int:
        buf = ctypes.create_string_buffer(int(size))
        with self.lock:
            self.allocations[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def check_range(self, ptr: int, nbytes: int, what: str) -> None:
        with self.lock:
            regions = [(a, ctypes.sizeof(b)) for a, b in self.allocations.items()]
        inside = any(a <= ptr and ptr + nbytes <= a + n for a, n in regions)
        if not inside and not (self.allow_foreign and not any(a <= ptr < a + n for a, n in regions)):
            raise HarnessError(f"{what}: {nbytes} bytes at {ptr:#x} is outside every allocation (a buffer overrun)")

    def array(self, ptr: int, dtype: np.dtype, shape: list[int]) -> np.ndarray:
        n = int(np.prod(shape)) * dtype.itemsize
        self.check_range(ptr, n, "engine tensor")
        return np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=dtype).reshape(shape)

    def enqueue(self, stream: int, op: Callable[[], None]) -> None:
        with self.lock:
            capture = self.capturing.get(int(stream))
        if capture is not None:
            capture.append(op)
        else:
            op()

    def success(self, *values: Any) -> tuple:
        return (self.real.cudaError_t.cudaSuccess, *values)

    # Emulations, by cuda-python function name; arguments arrive bound by name.
    def cudaGetDeviceCount(self, a: dict) -> tuple:
        if self.no_gpu:
            return (self.real.cudaError_t.cudaErrorNoDevice, 0)
        return self.success(1)

    def cudaGetDeviceProperties(self, a: dict) -> tuple:
        return self.success(FakeProps(self, name=b"NVIDIA Fake GPU\x00", major=9, minor=0, totalGlobalMem=80 << 30))

    def cudaSetDevice(self, a: dict) -> tuple:
        return self.success()

    def cudaMalloc(self, a: dict) -> tuple:
        return self.success(self.alloc(a["size"]))

    def cudaMallocHost(self, a: dict) -> tuple:
        return self.success(self.alloc(a["size"]))

    def _free(self, ptr: int) -> tuple:
        with self.lock:
            if int(ptr) not in self.allocations:
                raise HarnessError(f"cudaFree of {int(ptr):#x}, which was never allocated (or freed twice)")
            del self.allocations[int(ptr)]
        return self.success()

    def cudaFree(self, a: dict) -> tuple:
        return self._free(a["devPtr"])

    def cudaFreeHost(self, a: dict) -> tuple:
        return self._free(a["ptr"])

    def cudaMemcpyAsync(self, a: dict) -> tuple:
        dst, src, count = int(a["dst"]), int(a["src"]), int(a["count"])
        self.check_range(dst, count, "cudaMemcpyAsync destination")
        self.check_range(src, count, "cudaMemcpyAsync source")
        self.enqueue(int(a["stream"]), lambda: ctypes.memmove(dst, src, count))
        return self.success()

    def cudaStreamCreateWithFlags(self, a: dict) -> tuple:
        return self.success(self.real.cudaStream_t(init_value=self.handle()))

    def cudaEventCreateWithFlags(self, a: dict) -> tuple:
        return self.success(self.real.cudaEvent_t(init_value=self.handle()))

    def _ok(self, a: dict) -> tuple:
        return self.success()

    cudaStreamSynchronize = cudaStreamDestroy = cudaEventRecord = cudaStreamWaitEvent = cudaEventDestroy = _ok
    cudaGraphExecDestroy = cudaGraphDestroy = _ok

    def cudaStreamBeginCapture(self, a: dict) -> tuple:
        with self.lock:
            self.capturing[int(a["stream"])] = []
        return self.success()

    def cudaStreamEndCapture(self, a: dict) -> tuple:
        with self.lock:
            ops = self.capturing.pop(int(a["stream"]))
        graph = self.handle()
        self.graphs[graph] = ops
        return self.success(self.real.cudaGraph_t(init_value=graph))

    def cudaGraphInstantiate(self, a: dict) -> tuple:
        exec_handle = self.handle()
        self.graphs[exec_handle] = self.graphs[int(a["graph"])]
        return self.success(self.real.cudaGraphExec_t(init_value=exec_handle))

    def cudaGraphLaunch(self, a: dict) -> tuple:
        for op in self.graphs[int(a["graphExec"])]:
            self.enqueue(int(a["stream"]), op)
        return self.success()


class FakeProps:
    """A cudaDeviceProp whose attribute reads are checked against the real struct."""

    def __init__(self, world: CudaWorld, **values: Any) -> None:
        self._world, self._values = world, values

    def __getattr__(self, name: str) -> Any:
        self._world.rec.name(f"cudaDeviceProp.{name}")
        if not hasattr(self._world.real.cudaDeviceProp(), name):
            self._world.rec.violation(f"cudaDeviceProp.{name} does not exist in cuda-python")
            raise AttributeError(name)
        if name not in self._values:
            raise HarnessError(f"no emulation for cudaDeviceProp.{name}")
        return self._values[name]


class FakeCudart:
    """Stands in for ``cuda.bindings.runtime``: names and calls checked against the real module."""

    def __init__(self, world: CudaWorld) -> None:
        self._world = world

    def __getattr__(self, name: str) -> Any:
        world = self._world
        world.rec.name(f"cudart.{name}")
        real = getattr(world.real, name, None)
        if real is None:
            world.rec.violation(f"cudart.{name} does not exist in cuda-python {world.version}")
            raise AttributeError(name)
        if not callable(real) or isinstance(real, type) or name in ("cudaGetErrorString", "cudaGetErrorName"):
            return real  # enums, constants, struct types; error strings need no GPU
        try:
            sig = inspect.signature(real)
        except (TypeError, ValueError):
            raise HarnessError(f"cudart.{name} has no signature to check against") from None

        def call(*args: Any, **kwargs: Any) -> Any:
            shown = ", ".join([*(_short(x) for x in args), *(f"{k}={_short(v)}" for k, v in kwargs.items())])
            world.rec.call(f"cudart.{name}({shown})")
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as e:
                world.rec.violation(f"cudart.{name}({shown}) does not fit {name}{sig}: {e}")
                return (world.real.cudaError_t.cudaErrorInvalidValue,)
            for pname, value in bound.arguments.items():
                ann = sig.parameters[pname].annotation
                target = getattr(world.real, ann, None) if isinstance(ann, str) else None
                if isinstance(target, type) and not isinstance(value, target):
                    world.rec.violation(f"cudart.{name}: {pname}={_short(value)} is not a {ann}")
            emulate = getattr(world, name, None)
            if emulate is None:
                raise HarnessError(f"no emulation for cudart.{name}")
            return emulate(dict(bound.arguments))

        return call
