"""Settings of the training service (`MEDIMG_TRAINING_*`)."""

from pydantic_settings import SettingsConfigDict

from medimg_core.settings import ServiceSettings


class TrainingSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MEDIMG_TRAINING_", frozen=True)

    port: int = 7103
