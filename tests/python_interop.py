"""Drives background-workflows 0.3.0 on Azure for tests/python_interop.rs.

Usage: python_interop.py start ACTIVITY RESOURCE_ID KWARGS_JSON
       python_interop.py status TASK_ID RESOURCE_ID
       python_interop.py result TASK_ID RESOURCE_ID

The connection string, table names and queue name come from
AZURE_STORAGE_CONNECTION_STRING, ACTIVE_TABLE_NAME, FINISHED_TABLE_NAME and BGW_QUEUE.
Each command prints one JSON value on stdout.
"""

import json
import logging
import os
import sys

from background_workflows.storage.blobs.azure_blob_store import AzureBlobStore
from background_workflows.storage.queue.azure_queue_backend import AzureQueueBackend
from background_workflows.storage.tables.azure_task_store import AzureTaskStore
from background_workflows.utils.workflow_client import WorkflowClient


def client() -> WorkflowClient:
    connection = os.environ["AZURE_STORAGE_CONNECTION_STRING"]
    store = AzureTaskStore(
        connection,
        os.environ["ACTIVE_TABLE_NAME"],
        os.environ["FINISHED_TABLE_NAME"],
    )
    store.create_if_not_exists()
    queue = AzureQueueBackend(connection, os.environ["BGW_QUEUE"])
    queue.create_queue()
    return WorkflowClient(store, queue, AzureBlobStore(connection))


def main() -> None:
    logging.disable(logging.CRITICAL)
    command = sys.argv[1]
    workflow = client()
    if command == "start":
        activity, resource_id, kwargs = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        task_id = workflow.start_activity(
            activity,
            resource_id=resource_id,
            store_mode="azure",
            active_table_name=os.environ["ACTIVE_TABLE_NAME"],
            finished_table_name=os.environ["FINISHED_TABLE_NAME"],
            **kwargs,
        )
        print(json.dumps(task_id))
    elif command == "status":
        print(json.dumps(workflow.get_status(sys.argv[2], sys.argv[3])))
    elif command == "result":
        print(json.dumps(workflow.get_result(sys.argv[2], sys.argv[3])))
    else:
        raise SystemExit(f"unknown command {command!r}: expected start, status or result")


if __name__ == "__main__":
    main()
