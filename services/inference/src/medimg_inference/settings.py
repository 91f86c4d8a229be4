"""Settings of the inference service (`MEDIMG_INFERENCE_*`)."""

from pydantic_settings import SettingsConfigDict

from medimg_core.settings import ServiceSettings


class InferenceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MEDIMG_INFERENCE_", frozen=True)

    port: int = 7102
