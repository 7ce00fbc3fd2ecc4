from django.apps import AppConfig


class Tim3WebConfig(AppConfig):
    name = "tim3web"
    verbose_name = "TIM3 web"

    def ready(self) -> None:
        from processes.runtime.signals import messages_settled
        from tim3web import events

        messages_settled.connect(events.publish_hops, dispatch_uid="tim3web-publish-hops")

        from processes.flows import flows_ended

        flows_ended.connect(events.publish_flow_ends, dispatch_uid="tim3web-publish-flow-ends")
