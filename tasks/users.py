"""users.create, users.update, users.delete (their rules: worker/apply.py SPECS)."""

from worker.commands import command_task

create = command_task("users.create")
update = command_task("users.update")
delete = command_task("users.delete")
