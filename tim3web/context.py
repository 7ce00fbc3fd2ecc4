from django.conf import settings


def site(request) -> dict:
    return {"TIM3_ENV": settings.TIM3_ENV, "TIM3_MODE": settings.TIM3_MODE}
