"""Run one ensemble of a generated model repository the way Triton would, without Triton.

    python ensemble_sim.py REPO ENSEMBLE REQUEST.json OUT.npz

REQUEST.json: {"requests": [[item, ...], ...]} where an item is an image path (read as bytes) or a
string, per the ensemble's input. Each request goes through the ensemble's steps in order, wired by
their input_map/output_map: Python-backend models through their own model.py (with the stand-in
triton_python_backend_utils from ./stub), ONNX models through ONNX Runtime on the file in the
repository. The Python models of one step get all requests at once, as Triton's dynamic batcher
would give them. Writes out_<i> per request (or err_<i>) and facts about the process.

Runs in its own process: the Python models import the clipdeploy copy vendored beside them, and
nothing here imports clipdeploy first.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "stub"))

import triton_python_backend_utils as pb_utils  # noqa: E402  (the stand-in)
from google.protobuf import json_format, text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402


def load_config(repo, name):
    cfg = model_config_pb2.ModelConfig()
    text_format.Parse((repo / name / "config.pbtxt").read_text(), cfg)
    return cfg


class PythonModel:
    def __init__(self, repo, cfg):
        path = repo / cfg.name / "1" / "model.py"
        spec = importlib.util.spec_from_file_location(f"triton_model_{cfg.name.replace('-', '_')}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.model = module.TritonPythonModel()
        as_json = json_format.MessageToJson(cfg, preserving_proto_field_name=True)
        self.model.initialize(
            {
                "model_config": as_json,
                "model_instance_kind": "CPU",
                "model_name": cfg.name,
                "model_version": "1",
                "model_repository": str(repo / cfg.name),
            }
        )

    def __call__(self, batch):
        requests = [pb_utils.InferenceRequest([pb_utils.Tensor(k, v) for k, v in feed.items()]) for feed in batch]
        out = []
        for response in self.model.execute(requests):
            if response.has_error():
                out.append(str(response.error()))
            else:
                out.append({t.name(): t.as_numpy() for t in response.output_tensors()})
        return out


class OnnxModel:
    def __init__(self, repo, cfg):
        import onnxruntime as ort

        self.session = ort.InferenceSession(
            str(repo / cfg.name / "1" / cfg.default_model_filename), providers=["CPUExecutionProvider"]
        )

    def __call__(self, batch):
        out = []
        for feed in batch:
            names = [o.name for o in self.session.get_outputs()]
            out.append(dict(zip(names, self.session.run(names, feed), strict=True)))
        return out


def main(repo, ensemble, request_file, out_file):
    repo = Path(repo)
    ens = load_config(repo, ensemble)
    (client_input,) = ens.input
    requests = json.loads(Path(request_file).read_text())["requests"]
    states = []
    for items in requests:
        if client_input.name == "IMAGE":
            blobs = [Path(p).read_bytes() for p in items]
        else:
            blobs = [s.encode("utf-8") for s in items]
        states.append({client_input.name: np.array(blobs, dtype=object).reshape(-1, 1)})
    errors = {}
    facts = {"steps": []}
    for step in ens.ensemble_scheduling.step:
        cfg = load_config(repo, step.model_name)
        if cfg.backend == "python":
            model = PythonModel(repo, cfg)
        elif cfg.platform == "onnxruntime_onnx":
            model = OnnxModel(repo, cfg)
        else:
            raise SystemExit(f"cannot run {cfg.name}: platform {cfg.platform!r} needs a GPU and TensorRT")
        facts["steps"].append({"model": cfg.name, "backend": cfg.backend or cfg.platform})
        live = [i for i in range(len(states)) if i not in errors]
        feeds = [{k: states[i][v] for k, v in step.input_map.items()} for i in live]
        for i, result in zip(live, model(feeds), strict=True):
            if isinstance(result, str):
                errors[i] = result
                continue
            for k, v in step.output_map.items():
                states[i][v] = result[k]
    arrays = {}
    for i, state in enumerate(states):
        if i in errors:
            arrays[f"err_{i}"] = np.array(errors[i])
        else:
            for o in ens.output:
                arrays[f"out_{i}"] = state[o.name]
    vendored = sys.modules.get("clipdeploy")
    facts["clipdeploy_file"] = getattr(vendored, "__file__", None)
    facts["heavy"] = sorted(m for m in ("torch", "open_clip", "onnx", "tensorrt") if m in sys.modules)
    arrays["facts"] = np.array(json.dumps(facts))
    np.savez(out_file, **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:5])
