"""longcat-service: LongCat-Flash inference (MoE ops, model runner, gRPC service)."""

from longcat_service.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch model code; keep `import longcat_service` light for the client SDK.
    if name == "LLM":
        from longcat_service.llm import LLM

        return LLM
    if name == "RequestOutput":
        from longcat_service.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(name)
