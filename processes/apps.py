from django.apps import AppConfig


class ProcessesConfig(AppConfig):
    name = "processes"
    verbose_name = "TIM3 processes"

    def ready(self) -> None:
        from processes.blueprints import token  # noqa: F401  (registers the blueprints)
