"""tags.create, tags.update, tags.delete (their rules: worker/apply.py SPECS)."""

from worker.commands import command_task

create = command_task("tags.create")
update = command_task("tags.update")
delete = command_task("tags.delete")
