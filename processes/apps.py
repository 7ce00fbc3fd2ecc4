from django.apps import AppConfig


class ProcessesConfig(AppConfig):
    name = "processes"
    verbose_name = "TIM3 processes"

    def ready(self) -> None:
        from processes.blueprints import coordinator, lock_manager, state_manager, token  # noqa: F401  (registers them)
        from processes.flows import track_flows
        from processes.runtime import prepared
        from processes.runtime.signals import messages_applied

        messages_applied.connect(track_flows, dispatch_uid="processes-track-flows")
        prepared.install()
