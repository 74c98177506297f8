"""`POST /webhooks/stripe`: verify the signature on the raw body, store the event
(unique on Stripe's id), answer 2xx, and enqueue its processing after the commit
(only for event types the portal handles: the rest are stored as processed).

If Redis is down the event is still stored and acknowledged; the stored-event sweep
processes it later. Exempt from CSRF and from login, and from nothing else.
"""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from portal.billing.events import enqueue_processing, has_handler, store_event
from portal.bodies import read_body
from portal.extensions import db
from portal.metrics import record_webhook
from portal.stripe_gateway import WebhookRejected, verify_webhook

bp = Blueprint("webhooks", __name__)

MAX_WEBHOOK_BYTES = 512 * 1024


@bp.post("/webhooks/stripe")
def stripe_webhook():
    try:
        payload = read_body(MAX_WEBHOOK_BYTES)  # chunked or not: one byte over is a 413
    except RequestEntityTooLarge:
        record_webhook("rejected")
        return jsonify({"error": "body too large"}), 413
    try:
        event = verify_webhook(payload, request.headers.get("Stripe-Signature"),
                               current_app.config["STRIPE_WEBHOOK_SECRETS"])
    except WebhookRejected as rejected:
        record_webhook("rejected")
        return jsonify({"error": str(rejected)}), 400
    row_id, created = store_event(event)
    db.session.commit()
    record_webhook("stored" if created else "duplicate")
    if not has_handler(event["type"]):
        return jsonify({"received": True, "duplicate": not created})  # stored; nothing to do
    try:
        enqueue_processing(row_id)
    except Exception as error:  # Redis down: the event is stored, the sweep will process it
        current_app.logger.warning("stored Stripe event %s, could not enqueue: %s", event["id"], error)
    return jsonify({"received": True, "duplicate": not created})
