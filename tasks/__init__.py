"""The command tasks, one module per entity: thin bodies over the CRUD layer."""
