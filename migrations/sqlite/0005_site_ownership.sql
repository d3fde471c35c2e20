-- A site id belongs to the tenant that first created it, for good: DeleteSite marks the row
-- deleted instead of removing it, so no other tenant can ever take the id over.
ALTER TABLE sites ADD COLUMN deleted_at BIGINT;
