"""What a run is on devices and on disk: the device mesh (`mesh`), the train state and optimiser
(`train_state`), Orbax checkpoints and preemption (`checkpointing`), the recorded config of each
run segment (`run_config`), metric logs and the console (`logging_lib`), new folders written whole
beside their target (`staging`), and the process defaults that entry points set
(`process_env`). Imports only `core`.
"""
