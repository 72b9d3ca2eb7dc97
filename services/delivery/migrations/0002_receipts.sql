-- Delivery receipts name the provider's id of a message.
CREATE INDEX messages_by_provider_id ON messages (provider, provider_message_id)
    WHERE provider_message_id <> '';
