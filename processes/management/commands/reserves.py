import json

from django.core.management.base import BaseCommand

from processes.invariants import check_reserves, reserves_snapshot


class Command(BaseCommand):
    help = "Proof of reserves: TIM3 supply against USDA held by coordinators + USDA locked; exit 1 if broken."

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true")

    def handle(self, *args, json_output=False, **options):
        snapshot, problems = reserves_snapshot(), check_reserves()
        if options.get("json"):
            self.stdout.write(json.dumps({**snapshot, "problems": problems}, default=str))
        else:
            self.stdout.write(f"TIM3 supply      {snapshot['tim3_supply']}")
            self.stdout.write(f"USDA held        {snapshot['usda_held']}  (by coordinators)")
            self.stdout.write(f"USDA locked      {snapshot['usda_locked']}  (v1 collateral)")
            self.stdout.write(f"USDA reserves    {snapshot['usda_reserves']}")
            self.stdout.write(f"in flight        {snapshot['pending_operations']} operations, "
                              f"{snapshot['pending_messages']} messages")
            for line in problems:
                self.stdout.write(f"PROBLEM  {line}")
            self.stdout.write("reserves: OK" if not problems else "reserves: BROKEN")
        if problems:
            raise SystemExit(1)
