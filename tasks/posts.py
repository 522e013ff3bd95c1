"""posts.create, posts.update, posts.delete (their rules: worker/apply.py SPECS)."""

from worker.commands import command_task

create = command_task("posts.create")
update = command_task("posts.update")
delete = command_task("posts.delete")
